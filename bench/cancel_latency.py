"""How early does a cancelled row stop, and when is its place in the batch freed?

The engine runs static batches (one ``generate`` call per batch). A cancelled row is marked done
by the per-row stopping criterion at the next decoding step, so it stops emitting and its
result is published at once; the batch itself continues until its other rows finish, and only
then can a waiting request take the freed place. This script measures both on the demo model:

1. cancel -> result latency of a running row (one decoding step, expected);
2. cancel -> start of a queued request, when the cancelled row shares its batch with a long row
   (the remaining length of that neighbour);
3. the same when every row of the batch is cancelled (the batch ends at the next step).

Usage: ``python bench/cancel_latency.py [--neighbour-tokens 300]``
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from pathlib import Path

import torch
from peftserve.server.engine import Engine
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.types import GenerationParams, GenerationRequest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo"


def _long(request_id: str, tokens: int) -> GenerationRequest:
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    return GenerationRequest(request_id, text="the quick brown fox", parameters=params)


async def _measure(engine: Engine, neighbour_tokens: int, cancel_all: bool) -> tuple[float, float]:
    victim = engine.submit(_long("victim", neighbour_tokens), stream=True)
    neighbour = engine.submit(_long("neighbour", neighbour_tokens), stream=True)
    await victim.__aiter__().__anext__()  # both rows are running now
    waiting = engine.submit(_long("waiting", 2), stream=True)
    started = time.perf_counter()
    victim.cancel()
    if cancel_all:
        neighbour.cancel()
    await victim.result()
    row_stop_ms = (time.perf_counter() - started) * 1000
    await waiting.__aiter__().__anext__()  # its first token: it has a place in a batch
    place_freed_ms = (time.perf_counter() - started) * 1000
    await waiting.result()
    await neighbour.result()
    return row_stop_ms, place_freed_ms


async def main_async(neighbour_tokens: int) -> None:
    config = EngineConfig(
        model_path=DEMO / "base",
        adapters_dir=DEMO / "adapters",
        max_batch_size=2,
        max_wait_ms=20.0,
    )
    engine = await asyncio.to_thread(Engine, config)
    await engine.start()
    try:
        await _measure(engine, 8, cancel_all=False)  # warm-up
        step = await engine.submit(replace(_long("step", 20), request_id="step")).result()
        step_ms = step.inference_ms / 20
        row_stop, freed = await _measure(engine, neighbour_tokens, cancel_all=False)
        all_stop, all_freed = await _measure(engine, neighbour_tokens, cancel_all=True)
    finally:
        await engine.stop()
    print(f"one decoding step (batch of 1): {step_ms:.1f} ms")
    print(f"cancel -> row result:                         {row_stop:8.1f} ms")
    print(f"cancel -> queued request starts (neighbour {neighbour_tokens} tokens): {freed:8.1f} ms")
    print(f"cancel all rows -> row result:                {all_stop:8.1f} ms")
    print(f"cancel all rows -> queued request starts:     {all_freed:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbour-tokens", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    asyncio.run(main_async(args.neighbour_tokens))


if __name__ == "__main__":
    main()
