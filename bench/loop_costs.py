"""Measured costs of the decode loop's verbs: a decode step, a join, a leave, KV bytes per token.

Runs the engine's own pieces (``ModelStep``, ``SubBatch``, ``Sampler``, ``kv_cache``) on the
demo model (or ``--model-path``), on the base model, greedy, CPU unless CUDA is present:

* step: one decode forward of a sub-batch of N rows at width W plus the sampler's choice;
* join: a request entering a running sub-batch = its prefill forward (prompt of P tokens)
  plus ``SubBatch.merge`` into a sub-batch that has a free row slot (a row left before);
* join x4: four such requests merged in one ``SubBatch.merge`` (all joiners of a step) into
  a sub-batch with four free slots;
* leave: ``SubBatch.filter`` dropping the first row (its slot filled, all-padding columns
  trimmed);
* memory: the cache's key/value bytes per cached token, live and allocated.

With ``--clients C`` it also runs the whole loop in process: the engine on the demo model and
adapters, C closed-loop clients each sending greedy requests of 16-48 new tokens (exactly that
many: ``min_new_tokens``) on the base model and the LoRA adapters until ``--loop-requests``
are done; tokens/s per cache kind, the kinds alternating ``--loop-rounds`` times.

Each cell is measured for each ``--caches`` kind, the kinds alternating repeat by repeat:
``slot`` is the engine's cache (``kv_cache.new_cache``: slot layers written in place),
``dynamic`` is transformers' plain ``DynamicCache`` (``torch.cat`` every step, a copy of the
whole sub-batch on a join or leave), what the loop used before. ``--forward fast,model``
crosses them with the forward: ``fast`` is the step's bit-identical fast forward
(``fastpath.py``, the default), ``model`` the model's own forward (kinds then read
``slot/fast``, ``slot/model``, ...), all alternating in one run.
Medians of ``--repeats`` runs. Usage:
``python bench/loop_costs.py [--rows 1,8,32] [--width 64] [--prompt 32] [--repeats 30]
[--threads 1] [--caches slot,dynamic] [--forward fast,model]
[--clients 64 --loop-requests 256 --loop-rounds 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import cProfile
import os
import pstats
import random
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peftserve.server.engine import Engine, kv_cache
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.registry import AdapterRegistry
from peftserve.server.engine.running import SubBatch, SubBatchKey
from peftserve.server.engine.sampler import Sampler
from peftserve.server.engine.step import ModelStep, prefill_inputs
from peftserve.server.engine.types import GenerationParams, GenerationRequest
from transformers import AutoModelForCausalLM, DynamicCache

REPO = Path(__file__).resolve().parents[1]
KEY = SubBatchKey("base", None)


def _row() -> Any:
    # What the sampler and the step read of a greedy base row.
    return SimpleNamespace(
        processors=[], samples=False, logprobs_top_n=None, job=None, constraint=None
    )


Timed = tuple[Callable[[Any], object], Callable[[], Any]]  # (fn, untimed setup)


def _medians_ms(cases: dict[str, Timed], repeats: int) -> dict[str, float]:
    """Median wall time of ``fn(setup())`` in ms per case, the cases alternating (in turn
    forwards and backwards) so that a change of the machine's load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            fn, setup = cases[name]
            arg = setup()
            started = time.perf_counter()
            fn(arg)
            times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def _none() -> None:
    return None


def _cache_kind(kind: str) -> str:
    return kind.split("/")[0]


def _forward_kind(kind: str) -> str:
    return kind.split("/")[1] if "/" in kind else "fast"


def _new_cache(kind: str, step: ModelStep) -> DynamicCache:
    if _cache_kind(kind) == "slot":
        return kv_cache.new_cache(step.model_config)
    return DynamicCache(config=step.model_config.get_text_config(decoder=True))


def _sub_batch(
    step: ModelStep, sampler: Sampler, rows: int, width: int, vocab: int, kind: str
) -> SubBatch:
    """A running sub-batch of ``rows`` rows whose prompts are 1..width tokens (real padding)."""
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    lengths = [max(1, width - (i * 7) % max(1, width // 2)) for i in range(rows)]
    prompts = [tuple(torch.randint(3, vocab, (n,), generator=gen).tolist()) for n in lengths]
    ids, mask, positions, pads = prefill_inputs(prompts, 0, step.device)
    cache = _new_cache(kind, step)
    members = [_row() for _ in prompts]
    step.fast.enabled = _forward_kind(kind) == "fast"
    logits = step.forward(KEY, members, ids, mask, positions, cache)  # type: ignore[arg-type]
    batch = SubBatch(
        KEY,
        members,  # type: ignore[arg-type]
        cache,
        mask,
        pads,
        torch.tensor(lengths, dtype=torch.long, device=step.device),
    )
    batch.next_tokens = sampler.choose(logits, members).tokens  # type: ignore[arg-type]
    return batch


def _with_free_slot(batch: SubBatch, free: int = 1) -> SubBatch:
    """A copy of ``batch`` with ``free`` more rows, which then leave: slots free for joins."""
    copied = copy.deepcopy(batch)
    copied.merge([copy.deepcopy(_one_row(batch)) for _ in range(free)])
    copied.filter(list(range(len(batch))))
    return copied


def _one_row(batch: SubBatch) -> SubBatch:
    one = copy.deepcopy(batch)
    one.filter([0])
    return one


def _cells(
    step: ModelStep,
    sampler: Sampler,
    args: argparse.Namespace,
    vocab: int,
    rows: int,
    kinds: list[str],
) -> list[str]:
    """One table row per cache kind for sub-batches of ``rows`` rows, measured alternating."""
    batches = {k: _sub_batch(step, sampler, rows, args.width, vocab, k) for k in kinds}

    def decode(_: object, b: SubBatch, kind: str) -> None:
        step.fast.enabled = _forward_kind(kind) == "fast"
        ids, mask, positions = b.decode_inputs()
        logits = step.forward(KEY, b.rows, ids, mask, positions, b.cache)
        b.advance()
        b.next_tokens = sampler.choose(logits, b.rows).tokens

    for k, batch in batches.items():
        decode(None, batch, k)  # warm-up
    joiners = {
        k: [_sub_batch(step, sampler, 1, args.prompt - i, vocab, k) for i in range(4)]
        for k in kinds
    }
    # One group per verb, each timed on its own with the kinds alternating: a verb's garbage
    # (freed buffers) then never lands in another verb's timing.
    groups: dict[str, dict[str, Timed]] = {"step": {}, "prefill": {}, "merge": {}, "merge4": {}}
    groups["leave"] = {}
    for k in kinds:
        b, j = batches[k], joiners[k]
        groups["step"][k] = (lambda _, b=b, k=k: decode(None, b, k), _none)
        groups["prefill"][k] = (
            lambda _, k=k: _sub_batch(step, sampler, 1, args.prompt, vocab, k),
            _none,
        )
        groups["merge"][k] = (
            lambda p: p[0].merge(p[1]),
            lambda b=b, j=j: (_with_free_slot(b), [copy.deepcopy(j[0])]),
        )
        groups["merge4"][k] = (
            lambda p: p[0].merge(p[1]),
            lambda b=b, j=j: (_with_free_slot(b, len(j)), copy.deepcopy(j)),
        )
        groups["leave"][k] = (
            lambda c: c.filter(list(range(1, len(c)))),
            lambda b=b: copy.deepcopy(b),
        )
    ms = {
        f"{verb} {k}": t
        for verb, cases in groups.items()
        for k, t in _medians_ms(cases, args.repeats).items()
    }
    lines = []
    for k in kinds:
        batch = batches[k]
        tokens = len(batch) * batch.width
        per_token = kv_cache.nbytes(batch.cache) / tokens
        allocated = kv_cache.capacity_nbytes(batch.cache) / tokens
        lines.append(
            f"| {rows} | {k} | {ms[f'step {k}']:.2f} ms | {ms[f'prefill {k}']:.2f} ms "
            f"| {ms[f'merge {k}']:.3f} ms | {ms[f'merge4 {k}']:.3f} ms "
            f"| {ms[f'leave {k}']:.3f} ms | {per_token:.0f} / {allocated:.0f} |"
        )
    return lines


@contextlib.contextmanager
def _engine_cache(kind: str) -> Iterator[None]:
    """The engine's sub-batches get caches of ``kind`` while this is open."""
    original = kv_cache.new_cache
    forward = os.environ.get("PEFTSERVE_FAST_FORWARD")
    os.environ["PEFTSERVE_FAST_FORWARD"] = "1" if _forward_kind(kind) == "fast" else "0"
    if _cache_kind(kind) == "dynamic":
        kv_cache.new_cache = lambda config: DynamicCache(  # type: ignore[assignment]
            config=config.get_text_config(decoder=True)
        )
    try:
        yield
    finally:
        kv_cache.new_cache = original  # type: ignore[assignment]
        if forward is None:
            os.environ.pop("PEFTSERVE_FAST_FORWARD", None)
        else:
            os.environ["PEFTSERVE_FAST_FORWARD"] = forward


# Where the worker touches the KV cache, none nested in another: the model's ``Cache.update``
# (which calls every layer's update: the largest cumulative ``update`` in cache_utils.py) and
# the running batch's verbs.
KV_VERBS = {"merge", "drop_rows", "select_rows", "trim_left"}


def _kv_share(stats: pstats.Stats) -> float:
    """The KV cache's share of the worker's loop iterations (cumulative times)."""
    entries: Any = stats.stats  # type: ignore[attr-defined]
    verbs = update = total = 0.0
    for (filename, _, name), (_, _, _, cumulative, _) in entries.items():
        module = Path(filename).name
        if module == "kv_cache.py" and name in KV_VERBS:
            verbs += cumulative
        elif module == "cache_utils.py" and name == "update":
            update = max(update, cumulative)
        elif module == "batcher.py" and name == "_iterate":
            total += cumulative
    return (verbs + update) / total if total else 0.0


def _loop_tokens_per_s(args: argparse.Namespace, kind: str) -> tuple[float, float | None]:
    """Tokens/s of ``args.clients`` closed-loop clients through a fresh in-process engine,
    and with ``--profile`` the KV cache's share of the worker's time (cProfile)."""
    adapters = args.model_path.parent / "adapters"
    config = EngineConfig(
        model_path=args.model_path,
        adapters_dir=adapters if adapters.is_dir() else None,
        max_batch_size=args.clients,
        max_wait_ms=5.0,
    )
    engine = Engine(config)
    names = ["", *sorted(a.name for a in engine.adapters() if a.mixed_batching)]
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "hello"]
    work = [
        GenerationRequest(
            f"r{i}",
            text=" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))),
            adapter=rng.choice(names),
            parameters=GenerationParams(
                max_new_tokens=(n := rng.randint(16, 48)), min_new_tokens=n, do_sample=False
            ),
        )
        for i in range(args.loop_requests)
    ]

    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        batcher: Any = engine._batcher
        original = batcher._iterate

        def profiled(*a: Any, **k: Any) -> None:
            profiler.enable()  # cProfile sees only its own thread: enable inside the worker
            try:
                original(*a, **k)
            finally:
                profiler.disable()

        batcher._iterate = profiled

    async def run() -> float:
        await engine.start()
        queue = list(reversed(work))
        tokens = 0

        async def client() -> None:
            nonlocal tokens
            while queue:
                result = await engine.submit(queue.pop()).result()
                tokens += len(result.sequences[0].token_ids)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        elapsed = time.perf_counter() - started
        await engine.stop()
        return tokens / elapsed

    with _engine_cache(kind):
        rate = asyncio.run(run())
    return rate, None if profiler is None else _kv_share(pstats.Stats(profiler))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=REPO / "models" / "demo" / "base")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--caches", default="slot,dynamic")
    parser.add_argument("--forward", default="fast", help="fast, model or fast,model")
    parser.add_argument("--clients", type=int, default=0, help="also run the loop in process")
    parser.add_argument("--loop-requests", type=int, default=256)
    parser.add_argument("--loop-rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile the loop's worker")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    base: Any = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    base.to(device).eval()
    step = ModelStep(AdapterRegistry(base, None), device)
    sampler = Sampler(device, lambda t: str(t))
    vocab = int(base.config.get_text_config().vocab_size)
    forwards = args.forward.split(",")
    kinds = [
        c if forwards == ["fast"] else f"{c}/{f}" for c in args.caches.split(",") for f in forwards
    ]

    print(f"model {args.model_path.name}, device {device}, threads {args.threads}")
    print(f"width {args.width} cached tokens per row, join prompt {args.prompt} tokens\n")
    if args.rows:
        print(
            "| rows | cache | decode step | join: prefill | join: merge | join x4: one merge "
            "| leave: filter | KV bytes/token live / allocated |"
        )
        print("|---|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",") if r):
        print("\n".join(_cells(step, sampler, args, vocab, rows, kinds)), flush=True)
    if args.clients:
        print(f"\nthe loop in process: {args.clients} closed-loop clients, greedy, 16-48 tokens")
        if args.profile:
            print("(cProfiled: tokens/s are slower than unprofiled; the KV share is of the worker)")
        print("| round | " + " | ".join(f"{k} tokens/s" for k in kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for round_ in range(args.loop_rounds):
            cells = []
            for kind in kinds if round_ % 2 == 0 else list(reversed(kinds)):
                rate, share = _loop_tokens_per_s(args, kind)
                cells.append(
                    (kind, f"{rate:.0f}" + ("" if share is None else f" (KV {share:.1%})"))
                )
            cells.sort(key=lambda c: kinds.index(c[0]))
            print(f"| {round_ + 1} | " + " | ".join(c for _, c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
