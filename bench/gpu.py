"""``--gpu``: a realistic-size random model on CUDA, measured against the bandwidth roofline.

Decoding one step reads every weight once, whatever the batch size, so a memory-bound step
takes at least ``weight bytes / bandwidth`` seconds and a batch of B rows can produce at most
``B * bandwidth / weight bytes`` tokens per second (KV-cache and adapter reads ignored, which
only lowers the real bound). The mode builds a random Llama (``server/synthetic.py``, default
the ~1B preset) in bf16 with several random LoRA adapters, serves it with peftserve on the GPU,
and reports tokens/s at batch 1 and at the best batch as fractions of that roofline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .cells import Cell, cell_record, measure_cell, warmup_specs, workload_for
from .loadgen import LoadConfig, PeftServeTarget
from .machine import environment
from .metrics import LatencyObjective
from .report import write_report
from .servers import ServerProcess, child_env, peftserve_command
from .workload import WorkloadConfig

__all__ = ["roofline_tokens_per_s", "run_gpu"]


def roofline_tokens_per_s(batch_size: float, weight_bytes: int, bandwidth_gbs: float) -> float:
    """Upper bound on decode tokens/s for ``batch_size`` rows when weights stream once a step."""
    return batch_size * bandwidth_gbs * 1e9 / weight_bytes


def _cuda_problem() -> str | None:
    """Why the GPU mode cannot run here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        return f"CUDA is not available (torch {torch.__version__}, {build})"
    return None


def run_gpu(args: argparse.Namespace) -> int:
    """Run the GPU benchmark; refuses (exit 2) without CUDA."""
    problem = _cuda_problem()
    if problem is not None:
        print(f"--gpu needs a CUDA GPU: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    from peftserve.server.synthetic import build_random_model

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="peftserve-gpu-") as tmp:
        root = build_random_model(
            Path(tmp),
            preset=args.gpu_preset,
            num_lora_adapters=args.gpu_adapters,
            dtype="bfloat16",
        )
        base, adapters_dir = root / "base", root / "adapters"
        weight_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        adapters = sorted(p.name for p in adapters_dir.iterdir())
        concurrency = sorted(set(args.gpu_concurrency))
        output = args.output_tokens or (64, 128)
        workload = WorkloadConfig(
            num_requests=0,
            adapter_mix="uniform",
            min_output_tokens=output[0],
            max_output_tokens=output[1],
            seed=args.seed,
        )
        objective = LatencyObjective(ttft_ms=args.slo_ttft_ms, e2e_ms=args.slo_e2e_ms)
        server = ServerProcess(
            "peftserve-gpu",
            peftserve_command(
                base,
                adapters_dir,
                max(concurrency),
                [
                    "--device",
                    "cuda",
                    "--dtype",
                    "bfloat16",
                    "--max-batch-tokens",
                    str(max(concurrency) * 1024),
                ],
            ),
            child_env(args.torch_threads),
            out_dir / "logs" / "peftserve-gpu.log",
        )
        cells: list[dict[str, Any]] = []
        with server:
            address = server.start(timeout_s=600)
            for clients in concurrency:
                cell = Cell(
                    id=f"gpu-unary-uniform-c{clients}",
                    baseline="gpu",
                    system="peftserve-gpu",
                    label=f"peftserve on GPU, {args.gpu_preset} bf16",
                    concurrency=clients,
                    mode="closed",
                    stream=False,
                    adapter_mix="uniform",
                    max_batch_size=max(concurrency),
                    series="peftserve GPU, unary",
                )
                specs = workload_for(
                    workload, cell, max(args.requests or 64, 4 * clients), adapters, adapters
                )
                result = measure_cell(
                    cell,
                    lambda: PeftServeTarget(address),
                    specs,
                    LoadConfig(
                        mode="closed", concurrency=clients, duration_s=args.duration_s or 120.0
                    ),
                    warmup_specs(workload, cell, adapters, adapters),
                    server.log_lines,
                )
                record = cell_record(cell, result, objective)
                batch = record["metrics"]["mean_batch_size"] or float(clients)
                roof = roofline_tokens_per_s(batch, weight_bytes, args.gpu_bandwidth_gbs)
                record["roofline_tokens_per_s"] = roof
                record["fraction_of_roofline"] = record["metrics"]["output_tokens_per_s"] / roof
                cells.append(record)
                print(
                    f"  {cell.id}: {record['metrics']['output_tokens_per_s']:.0f} tok/s, "
                    f"{100 * record['fraction_of_roofline']:.1f}% of roofline",
                    file=sys.stderr,
                )
    best = max(cells, key=lambda c: c["metrics"]["output_tokens_per_s"])
    single = cells[0]
    results: dict[str, Any] = {
        "meta": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "elapsed_s": time.time() - started,
            "mode_name": "gpu",
            "model_path": f"synthetic {args.gpu_preset} (bf16)",
            "adapters": adapters,
            "min_output_tokens": output[0],
            "max_output_tokens": output[1],
            "torch_threads": args.torch_threads,
            "objective": vars(objective),
            "weight_bytes": weight_bytes,
            "bandwidth_gbs": args.gpu_bandwidth_gbs,
            "environment": environment(),
        },
        "cells": cells,
        "ratios": [
            {
                "name": "best/batch1",
                "description": f"best ({best['id']}) vs one client",
                "value": best["metrics"]["output_tokens_per_s"]
                / max(single["metrics"]["output_tokens_per_s"], 1e-9),
                "target": 1.0,
                "op": ">=",
                "met": True,
                "numerator": best["metrics"]["output_tokens_per_s"],
                "denominator": single["metrics"]["output_tokens_per_s"],
            }
        ],
        "skipped": [],
        "profile": None,
    }
    write_report(results, out_dir)
    return 0
