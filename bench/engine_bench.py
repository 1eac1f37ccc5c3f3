"""Engine benchmark: batched mixed-adapter generation vs one-by-one ``PeftModel.generate``.

Measures, in one run on the same model:

1. 16 concurrent mixed-adapter requests through the engine vs the same 16 requests one by one
   through ``PeftModel.generate`` (target: >= 5x);
2. 16 mixed-adapter requests vs 16 requests on a single adapter, both through the engine
   (target: >= 0.8x, i.e. mixing adapters in a batch costs little);

then prints a cProfile summary of the engine's worker thread for the mixed run.

Uses ``models/demo`` when its adapters exist, else a synthetic model (``--preset``).
Usage: ``python bench/engine_bench.py [--preset tiny|small] [--new-tokens 32] [--threads 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peftserve.server.engine import Engine
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.types import GenerationParams, GenerationRequest
from peftserve.server.synthetic import build_random_model
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo"
N_REQUESTS = 16


def model_dirs(preset: str, scratch: Path) -> tuple[Path, Path]:
    if (DEMO / "adapters").is_dir() and preset == "demo":
        return DEMO / "base", DEMO / "adapters"
    out = build_random_model(scratch / "model", preset=preset, num_lora_adapters=3)
    return out / "base", out / "adapters"


def requests(adapters: list[str], new_tokens: int) -> list[GenerationRequest]:
    prompts = ["the quick brown fox", "hello there", "a b c d e f g", "lorem ipsum dolor sit amet"]
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return [
        GenerationRequest(
            f"r{i}",
            text=prompts[i % len(prompts)] * (1 + i % 3),
            adapter=adapters[i % len(adapters)],
            parameters=params,
        )
        for i in range(N_REQUESTS)
    ]


async def run_engine(engine: Engine, batch: list[GenerationRequest]) -> float:
    start = time.perf_counter()
    handles = [engine.submit(r) for r in batch]
    results = await asyncio.gather(*(h.result() for h in handles))
    elapsed = time.perf_counter() - start
    # min_new_tokens == max_new_tokens: every request does exactly the same work as its solo twin.
    assert all(len(r.sequences[0].token_ids) == batch[0].parameters.max_new_tokens for r in results)
    return elapsed


def run_solo(base_dir: Path, adapters_dir: Path, batch: list[GenerationRequest]) -> float:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    names = sorted({r.adapter for r in batch if r.adapter})
    model = PeftModel.from_pretrained(base, adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters_dir / name, adapter_name=name)
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for r in batch:
            ids = tokenizer(r.text, return_tensors="pt")
            n = r.parameters.max_new_tokens
            if r.adapter:
                model.set_adapter(r.adapter)
                model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            else:
                with model.disable_adapter():
                    model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="demo (models/demo) or a synthetic preset")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        base_dir, adapters_dir = model_dirs(args.preset, Path(scratch))
        engine = Engine(
            EngineConfig(model_path=base_dir, adapters_dir=adapters_dir, max_wait_ms=5.0)
        )
        lora = sorted(a.name for a in engine.adapters() if a.mixed_batching)
        mixed = requests(["", *lora], args.new_tokens)
        single = requests([lora[0]], args.new_tokens)
        n_params = sum(p.numel() for p in engine.registry.base.parameters())
        print(
            f"model {base_dir} ({n_params:,} params), device {engine.info.device}, "
            f"threads {args.threads}, adapters {lora}, "
            f"{N_REQUESTS} requests x {args.new_tokens} new tokens"
        )

        async def engine_runs() -> tuple[float, float, pstats.Stats]:
            await engine.start()
            await run_engine(engine, mixed)  # warm-up
            t_mixed = min([await run_engine(engine, mixed) for _ in range(args.repeats)])
            t_single = min([await run_engine(engine, single) for _ in range(args.repeats)])
            profiler = cProfile.Profile()
            batcher: Any = engine._batcher
            original = batcher._iterate

            def profiled(*a: Any, **k: Any) -> None:
                profiler.enable()  # cProfile sees only its own thread: enable inside the worker
                try:
                    original(*a, **k)
                finally:
                    profiler.disable()

            batcher._iterate = profiled
            await run_engine(engine, mixed)
            batcher._iterate = original
            await engine.stop()
            return t_mixed, t_single, pstats.Stats(profiler)

        t_mixed, t_single, stats = asyncio.run(engine_runs())
        t_solo = run_solo(base_dir, adapters_dir, mixed)
        hist = engine.stats().batch_size_histogram

    print(f"engine, 16 mixed-adapter requests : {t_mixed * 1000:8.1f} ms")
    print(f"engine, 16 single-adapter requests: {t_single * 1000:8.1f} ms")
    print(f"solo PeftModel.generate, 16 x 1   : {t_solo * 1000:8.1f} ms")
    print(f"batch sizes seen: {dict(sorted(hist.items()))}")
    print(f"RATIO engine mixed vs solo one-by-one: {t_solo / t_mixed:5.2f}x (target >= 5x)")
    print(f"RATIO mixed vs single-adapter batches: {t_single / t_mixed:5.2f}x (target >= 0.8x)")
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(14)
    stats.sort_stats("tottime").print_stats(12)
    print("\nWhere the worker's time goes (cProfile, mixed run; cumulative, then own time):")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
