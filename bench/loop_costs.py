"""Measured costs of the decode loop's verbs: a decode step, a join, a leave, KV bytes per token.

Runs the engine's own pieces (``ModelStep``, ``SubBatch``, ``Sampler``, ``kv_cache``) on the
demo model (or ``--model-path``), on the base model, greedy, CPU unless CUDA is present:

* step: one decode forward of a sub-batch of N rows at width W plus the sampler's choice;
* join: a request entering a running sub-batch = its prefill forward (prompt of P tokens)
  plus ``SubBatch.merge`` (left-pad and concatenate the caches and masks);
* leave: ``SubBatch.filter`` dropping one row (select rows, trim all-padding columns);
* memory: the cache's key/value bytes per cached token.

Medians of ``--repeats`` runs. Usage: ``python bench/loop_costs.py [--rows 1,8,32]
[--width 64] [--prompt 32] [--repeats 30] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peftserve.server.engine import kv_cache
from peftserve.server.engine.registry import AdapterRegistry
from peftserve.server.engine.running import SubBatch, SubBatchKey
from peftserve.server.engine.sampler import Sampler
from peftserve.server.engine.step import ModelStep, prefill_inputs
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
KEY = SubBatchKey("base", None)


def _row() -> Any:
    # What the sampler and the step read of a greedy base row.
    return SimpleNamespace(
        processors=[], samples=False, logprobs_top_n=None, job=None, constraint=None
    )


def _median_ms(
    fn: Callable[[Any], object], repeats: int, setup: Callable[[], Any] = lambda: None
) -> float:
    """Median wall time of ``fn(setup())`` in ms; ``setup`` is not timed."""
    times = []
    for _ in range(repeats):
        arg = setup()
        started = time.perf_counter()
        fn(arg)
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def _sub_batch(step: ModelStep, sampler: Sampler, rows: int, width: int, vocab: int) -> SubBatch:
    """A running sub-batch of ``rows`` rows whose prompts are 1..width tokens (real padding)."""
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    lengths = [max(1, width - (i * 7) % max(1, width // 2)) for i in range(rows)]
    prompts = [tuple(torch.randint(3, vocab, (n,), generator=gen).tolist()) for n in lengths]
    ids, mask, positions, pads = prefill_inputs(prompts, 0, step.device)
    cache = kv_cache.new_cache(step.model_config)
    members = [_row() for _ in prompts]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=REPO / "models" / "demo" / "base")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    base: Any = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    base.to(device).eval()
    step = ModelStep(AdapterRegistry(base, None), device)
    sampler = Sampler(device, lambda t: str(t))
    vocab = int(base.config.get_text_config().vocab_size)

    print(f"model {args.model_path.name}, device {device}, threads {args.threads}")
    print(f"width {args.width} cached tokens per row, join prompt {args.prompt} tokens\n")
    print("| rows | decode step | join: prefill | join: merge | leave: filter | KV bytes/token |")
    print("|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        batch = _sub_batch(step, sampler, rows, args.width, vocab)
        members = batch.rows

        def decode(_: object, b: SubBatch = batch, m: list[Any] = members) -> None:
            ids, mask, positions = b.decode_inputs()
            logits = step.forward(KEY, m, ids, mask, positions, b.cache)
            b.advance()
            b.next_tokens = sampler.choose(logits, m).tokens

        decode(None)  # warm-up
        step_ms = _median_ms(decode, args.repeats)
        joiner = _sub_batch(step, sampler, 1, args.prompt, vocab)
        prefill_ms = _median_ms(
            lambda _: _sub_batch(step, sampler, 1, args.prompt, vocab), args.repeats
        )
        pair = (batch, joiner)
        merge_ms = _median_ms(
            lambda p: p[0].merge(p[1]), args.repeats, lambda p=pair: copy.deepcopy(p)
        )
        leave_ms = _median_ms(
            lambda b: b.filter(list(range(1, len(b)))),
            args.repeats,
            lambda b=batch: copy.deepcopy(b),
        )
        per_token = kv_cache.nbytes(batch.cache) / (len(batch) * batch.width)
        print(
            f"| {rows} | {step_ms:.2f} ms | {prefill_ms:.2f} ms | {merge_ms:.3f} ms "
            f"| {leave_ms:.3f} ms | {per_token:.0f} |"
        )


if __name__ == "__main__":
    main()
