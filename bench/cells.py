"""One benchmark cell: one system, one load shape, one adapter mix — measured and recorded.

A cell warms its target up with a few unmeasured requests, runs its workload under a progress
bar, joins the server's logged batch sizes onto the samples and summarizes them.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .loadgen import LoadConfig, LoadResult, RequestSample, Target, run_load
from .metrics import LatencyObjective, attach_batch_sizes, batch_sizes_from_log, summarize
from .workload import RequestSpec, WorkloadConfig, build_workload

__all__ = [
    "Cell",
    "CpuMeter",
    "cell_record",
    "measure_cell",
    "progress_bar",
    "warmup_specs",
    "workload_for",
]

# Warm-up requests per cell: enough to fill a batch's worth of lazy initialisation (kernels,
# caches, connection set-up) without costing much time.
MAX_WARMUP_REQUESTS = 8


@dataclass(frozen=True)
class Cell:
    """What is measured; ``series`` groups cells into a throughput-vs-concurrency line."""

    id: str
    baseline: str  # a | b | c | d | e | gpu
    # inprocess | peftserve | peftserve-b1 | peftserve-profiled | transformers-serve | ...
    system: str
    label: str
    concurrency: int
    mode: str
    stream: bool
    adapter_mix: str
    max_batch_size: int | None = None
    series: str | None = None


def workload_for(
    base: WorkloadConfig,
    cell: Cell,
    num_requests: int,
    adapters: Sequence[str],
    mixable: Sequence[str],
) -> list[RequestSpec]:
    """The cell's requests: same seed for every cell (so the same prompts and lengths),
    request ids prefixed with the cell id (so server log lines join back unambiguously)."""
    config = replace(
        base, num_requests=num_requests, adapter_mix=cell.adapter_mix, id_prefix=cell.id
    )
    return build_workload(config, adapters, mixable)


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar on a terminal; silent when output is not a terminal (CI logs, tests)."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, desc=desc, unit="req", leave=False, disable=None, file=sys.stderr)


def process_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds (user + system, all threads) used so far by ``pid`` (default: this process).

    On a machine with few cores the load generator and the server share the CPU, so how much
    each used is part of the result.
    """
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of /proc/PID/stat, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds used by this process and a server process between start and stop."""

    server_pid: int | None = None
    _start: tuple[float | None, float | None] = (None, None)
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None

    def start(self) -> None:
        server = process_cpu_s(self.server_pid) if self.server_pid is not None else None
        self._start = (process_cpu_s(), server)

    def stop(self) -> None:
        client_start, server_start = self._start
        client_now = process_cpu_s()
        if client_start is not None and client_now is not None:
            self.client_cpu_s = client_now - client_start
        if self.server_pid is not None and server_start is not None:
            server_now = process_cpu_s(self.server_pid)
            if server_now is not None:
                self.server_cpu_s = server_now - server_start


def measure_cell(
    cell: Cell,
    make_target: Callable[[], Target],
    specs: Sequence[RequestSpec],
    load: LoadConfig,
    warmup: Sequence[RequestSpec] = (),
    log_lines: Callable[[], list[str]] | None = None,
    cpu: CpuMeter | None = None,
) -> LoadResult:
    """Run ``warmup`` (unmeasured) then ``specs`` against a fresh target in a fresh loop."""

    async def go() -> LoadResult:
        # The target is made inside the loop: a grpc.aio channel belongs to the loop it was
        # created in.
        target = make_target()
        try:
            if warmup:
                warm = LoadConfig(
                    mode="closed",
                    concurrency=min(load.concurrency, len(warmup)),
                    duration_s=load.duration_s,
                    stream=load.stream,
                )
                await run_load(target, warmup, warm)
            bar = progress_bar(len(specs), cell.id)
            if cpu is not None:
                cpu.start()
            try:
                return await run_load(target, specs, load, on_done=lambda _: bar.update())
            finally:
                if cpu is not None:
                    cpu.stop()
                bar.close()
        finally:
            await target.close()

    result = asyncio.run(go())
    if log_lines is not None:
        attach_batch_sizes(result.samples, batch_sizes_from_log(log_lines()))
    return result


def warmup_specs(
    base: WorkloadConfig, cell: Cell, adapters: Sequence[str], mixable: Sequence[str]
) -> list[RequestSpec]:
    """A few requests drawn from another seed, ids marked as warm-up."""
    count = max(2, min(cell.concurrency, MAX_WARMUP_REQUESTS))
    config = replace(
        base,
        num_requests=count,
        adapter_mix=cell.adapter_mix,
        seed=base.seed + 1_000_003,
        id_prefix=f"warmup-{cell.id}",
    )
    return build_workload(config, adapters, mixable)


def cell_record(
    cell: Cell,
    result: LoadResult,
    objective: LatencyObjective,
    cpu: CpuMeter | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON record of a measured cell: its definition, metrics and raw latencies."""
    samples: list[RequestSample] = result.samples
    ok = [s for s in samples if s.ok]
    metrics = summarize(samples, result.wall_s, objective)
    # CPU cores kept busy on average during the cell (1.0 = one core fully used).
    for side in ("client", "server"):
        used = getattr(cpu, f"{side}_cpu_s", None) if cpu is not None else None
        metrics[f"{side}_cpu_s"] = used
        metrics[f"{side}_cores_busy"] = used / result.wall_s if used is not None else None
    return {
        **asdict(cell),
        "metrics": metrics,
        # Raw per-request latencies (ms) for CDF plots; small enough to keep.
        "e2e_ms_values": [round(s.e2e_s * 1000.0, 3) for s in ok],
        "ttft_ms_values": [round(t * 1000.0, 3) for s in ok if (t := s.ttft_s) is not None],
        **extra,
    }
