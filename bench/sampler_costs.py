"""Measured cost of one token choice (``Sampler.choose``) for a step of N rows with processors.

Compares, in one run on the same rows and logits, the sampler's batched processors with the
per-row path it replaced (each row's transformers processors on its own ids, one row at a
time, then one exponential draw and division per sampled row), for the configurations the
benchmark and clients use:

* ``min_new``: greedy, ``min_new_tokens = max_new_tokens`` (every ``bench.run`` request);
* ``penalties``: greedy, ``min_new_tokens`` + ``repetition_penalty`` + a single-token bad word;
* ``sampled``: seeded sampling, temperature + top-k + top-p + ``min_new_tokens``.

Rows have a prompt of ``--prompt`` tokens and get one more token per timed step (so the
repetition penalty's seen tokens grow as in decoding). Medians of ``--repeats`` steps.

``--engine``: then, the whole engine (in process, demo base model, ``--rows`` concurrent
requests of 32 tokens each, ``min_new_tokens = max_new_tokens``) with the sampler's batched
processors and with every row sent down the per-row path (its fallback for lists it cannot
batch), alternated three times each: the median time of a full decode step (``StepStats``
of steps where every row decodes) and the wall time of all requests.

Usage: ``python bench/sampler_costs.py [--rows 64] [--vocab 0] [--repeats 200] [--threads 1]
[--engine]`` (``--vocab 0``: the demo model's vocabulary; larger values time the same
processors on a vocabulary of that size).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from peftserve.server.engine import Engine, processors, sampler
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.rows import Row, RowFactory
from peftserve.server.engine.sampler import Sampler
from peftserve.server.engine.stats import StepStats
from peftserve.server.engine.types import GenerationParams, GenerationRequest
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
_MIN_NOISE = torch.finfo(torch.float32).tiny

CONFIGS: dict[str, dict[str, Any]] = {
    "min_new": {"do_sample": False, "min_new_tokens": 10_000},
    "penalties": {
        "do_sample": False,
        "min_new_tokens": 10_000,
        "repetition_penalty": 1.3,
        "bad_words_ids": [[7]],
    },
    "sampled": {
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.9,
        "min_new_tokens": 10_000,
    },
}


def _rows(
    base: Any, eos: int, config: dict[str, Any], n: int, prompt: int, vocab: int
) -> list[Row]:
    factory = RowFactory(base, cast(Any, None), CPU, (eos,))
    rng = random.Random(0)
    generation = GenerationConfig(eos_token_id=eos, pad_token_id=0, **config)
    rows = []
    for i in range(n):
        ids = tuple(rng.randrange(3, vocab) for _ in range(prompt))
        job = SimpleNamespace(
            prepared=SimpleNamespace(generation_config=generation, prompt_ids=ids)
        )
        sampled = bool(config["do_sample"])
        rows.append(
            Row(
                job=cast(Any, None),
                index=0,
                prompt=ids,
                processors=LogitsProcessorList(factory.processors(cast(Any, job))),
                generator=torch.Generator().manual_seed(i) if sampled else None,
                max_new_tokens=1 << 30,
                eos_ids=frozenset({eos}),
                stream=cast(Any, None),
                logprobs_top_n=None,
            )
        )
    return rows


def per_row_choose(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """The sampler before batched processors: processors and noise one row at a time."""
    scores = logits.clone()
    for i, row in enumerate(rows):
        ids = row.history(CPU)
        scores[i : i + 1] = row.processors(ids, scores[i : i + 1].clone())  # type: ignore[arg-type]
    sampled = [i for i, row in enumerate(rows) if row.samples]
    if sampled:
        picks = scores[sampled].softmax(dim=-1)
        for k, i in enumerate(sampled):
            noise = torch.empty_like(picks[k]).exponential_(generator=rows[i].generator)
            picks[k] /= noise.clamp_min_(_MIN_NOISE)
        scores[sampled] = picks
    ids: list[int] = scores.argmax(dim=-1).tolist()
    return ids


def _batched(sampler: Sampler) -> Any:
    return lambda logits, rows: sampler.choose(logits, rows).token_ids


def _time(choose: Any, rows: list[Row], logits: list[torch.Tensor]) -> tuple[float, list[int]]:
    times, tokens = [], []
    for lg in logits:
        started = time.perf_counter()
        ids = choose(lg, rows)
        times.append((time.perf_counter() - started) * 1000.0)
        for row, token in zip(rows, ids, strict=True):
            row.tokens.append(token)
        tokens.extend(ids)
    return statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=REPO / "models" / "demo" / "base")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=0)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", action="store_true", help="also the engine A/B")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base: Any = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    vocab = args.vocab or int(base.config.get_text_config().vocab_size)
    eos = int(base.config.eos_token_id)
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn((args.rows, vocab), generator=gen) * 3 for _ in range(args.repeats)]
    print(f"{args.rows} rows, vocab {vocab}, prompt {args.prompt}, threads {args.threads}\n")
    print("| config | per row (before) | batched (Sampler.choose) | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        old_rows = _rows(base, eos, config, args.rows, args.prompt, vocab)
        new_rows = _rows(base, eos, config, args.rows, args.prompt, vocab)
        sampler = Sampler(CPU, str)
        # Alternate short runs so both see the same load.
        old_ms, new_ms, same = [], [], True
        for part in range(4):
            chunk = logits[part::4]
            o, old_tokens = _time(per_row_choose, old_rows, chunk)
            n, new_tokens = _time(_batched(sampler), new_rows, chunk)
            old_ms.append(o)
            new_ms.append(n)
            same = same and old_tokens == new_tokens
        before, after = statistics.median(old_ms), statistics.median(new_ms)
        print(
            f"| {name} | {before:.3f} ms | {after:.3f} ms | {before / after:.1f}x "
            f"| {'yes' if same else 'NO'} |"
        )
    if args.engine:
        engine_ab(args.model_path, args.rows)


def _per_row_plan(row: Row) -> processors.RowPlan:
    return processors.RowPlan(len(row.processors), None)  # the sampler's per-row path


def engine_ab(model_path: Path, rows: int) -> None:
    """Decode steps of the engine with batched processors and with per-row processors."""
    print(f"\nengine, {rows} concurrent requests of 32 tokens, min_new_tokens = max_new_tokens\n")
    print("| config | processors | decode step (median) | wall time |")
    print("|---|---|---|---|")
    engine = Engine(
        EngineConfig(
            model_path=model_path, max_batch_size=rows, max_batch_tokens=1 << 20, max_wait_ms=50
        )
    )
    steps: list[StepStats] = []
    engine.add_step_listener(steps.append)
    configs = {
        "min_new": GenerationParams(max_new_tokens=32, min_new_tokens=32),
        "penalties": GenerationParams(
            max_new_tokens=32, min_new_tokens=32, repetition_penalty=1.3, bad_words=("q",)
        ),
    }

    async def run(params: GenerationParams) -> float:
        requests = [
            GenerationRequest(f"r{i}", text="the quick brown fox"[: 4 + i % 15], parameters=params)
            for i in range(rows)
        ]
        started = time.perf_counter()
        handles = [engine.submit(r) for r in requests]
        await asyncio.gather(*(h.result() for h in handles))
        return time.perf_counter() - started

    async def body() -> None:
        await engine.start()
        try:
            for name, params in configs.items():
                seen: dict[str, tuple[list[float], list[float]]] = {
                    "per row": ([], []),
                    "batched": ([], []),
                }
                for _ in range(3):
                    for mode in seen:
                        sampler.row_plan = (  # type: ignore[assignment]
                            _per_row_plan if mode == "per row" else processors.row_plan
                        )
                        steps.clear()
                        wall = await run(params)
                        full = [s.seconds for s in steps if s.decode_tokens == rows]
                        seen[mode][0].append(statistics.median(full) * 1000.0)
                        seen[mode][1].append(wall)
                for mode, (step_ms, walls) in seen.items():
                    print(
                        f"| {name} | {mode} | {statistics.median(step_ms):.2f} ms "
                        f"| {statistics.median(walls):.2f} s |"
                    )
        finally:
            sampler.row_plan = processors.row_plan
            await engine.stop()

    asyncio.run(body())


if __name__ == "__main__":
    main()
