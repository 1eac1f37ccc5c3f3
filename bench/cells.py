"""One benchmark cell: one system, one load shape, one adapter mix — measured and recorded.

A cell warms its target up with a few unmeasured requests, runs its workload under a progress
bar (optionally with background requests alongside), joins the server's logged batch sizes onto
the samples, reads the server's step histograms before and after, and summarizes them.
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
from .metrics import (
    LatencyObjective,
    attach_batch_sizes,
    batch_sizes_from_log,
    distribution,
    summarize,
)
from .server_metrics import scrape_steps, step_delta
from .workload import RequestSpec, WorkloadConfig, build_workload

__all__ = [
    "Background",
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
    # "" for the main sweep, else the scenario (bench/scenarios.py) that measured the cell.
    scenario: str = ""
    workload: str = "exact"  # exact: min = max new tokens; natural: ends at EOS
    rate_rps: float | None = None  # open-loop arrival rate


@dataclass(frozen=True)
class Background:
    """Requests that run alongside a cell's measured ones: ``concurrency`` closed-loop callers
    cycle through ``specs`` until the measured load has finished."""

    specs: Sequence[RequestSpec]
    concurrency: int = 1


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


def machine_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (all cores, /proc/stat).

    The machine is shared: busy time beyond the server's and the load generator's is other
    people's work competing for the same cores, and belongs in the report.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # cpu user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    values = [int(v) for v in fields[1:9]]
    busy = sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds (user + system, all threads) used so far by ``pid`` (default: this process)
    and, for a server, by its child processes (the engine process of ``--engine-process``).

    On a machine with few cores the load generator and the server share the CPU, so how much
    each used is part of the result.
    """
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    stats = _proc_stats()
    if pid not in stats:
        return None
    # A server's children are part of it: the engine process does its model work.
    ticks = stats[pid][1] + sum(t for ppid, t in stats.values() if ppid == pid)
    return ticks / os.sysconf("SC_CLK_TCK")


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, utime + stime in clock ticks) of every process."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, ...; utime and stime are fields 14 and 15 of
        # /proc/PID/stat, in clock ticks.
        stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return stats


@dataclass
class CpuMeter:
    """CPU seconds used by this process and a server process between start and stop."""

    server_pid: int | None = None
    _start: tuple[float | None, float | None, float | None] = (None, None, None)
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None
    machine_cpu_s: float | None = None

    def start(self) -> None:
        server = process_cpu_s(self.server_pid) if self.server_pid is not None else None
        self._start = (process_cpu_s(), server, machine_cpu_s())

    def stop(self) -> None:
        client_start, server_start, machine_start = self._start
        client_now = process_cpu_s()
        if client_start is not None and client_now is not None:
            self.client_cpu_s = client_now - client_start
        if self.server_pid is not None and server_start is not None:
            server_now = process_cpu_s(self.server_pid)
            if server_now is not None:
                self.server_cpu_s = server_now - server_start
        machine_now = machine_cpu_s()
        if machine_start is not None and machine_now is not None:
            self.machine_cpu_s = machine_now - machine_start

    @property
    def other_cpu_s(self) -> float | None:
        """Machine CPU time not used by the server or the load generator (other jobs)."""
        if self.machine_cpu_s is None:
            return None
        return max(
            0.0, self.machine_cpu_s - (self.client_cpu_s or 0.0) - (self.server_cpu_s or 0.0)
        )


def measure_cell(
    cell: Cell,
    make_target: Callable[[], Target],
    specs: Sequence[RequestSpec],
    load: LoadConfig,
    warmup: Sequence[RequestSpec] = (),
    log_lines: Callable[[], list[str]] | None = None,
    cpu: CpuMeter | None = None,
    background: Background | None = None,
    metrics_port: int | None = None,
) -> LoadResult:
    """Run ``warmup`` (unmeasured) then ``specs`` against a fresh target in a fresh loop,
    with ``background`` requests alongside; with ``metrics_port``, the server's step
    histograms are scraped around the measured part."""

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
            before = scrape_steps(metrics_port) if metrics_port else None
            if cpu is not None:
                cpu.start()
            done = asyncio.Event()
            extra: list[RequestSample] = []
            callers = [
                asyncio.create_task(_background_caller(target, background, i, done, extra))
                for i in range(background.concurrency if background else 0)
            ]
            try:
                result = await run_load(target, specs, load, on_done=lambda _: bar.update())
            finally:
                done.set()
                await asyncio.gather(*callers, return_exceptions=True)
                if cpu is not None:
                    cpu.stop()
                bar.close()
            result.background = extra
            if metrics_port:
                result.steps = step_delta(before, scrape_steps(metrics_port))
            return result
        finally:
            await target.close()

    result = asyncio.run(go())
    if log_lines is not None:
        attach_batch_sizes(result.samples, batch_sizes_from_log(log_lines()))
    return result


async def _background_caller(
    target: Target,
    background: Background | None,
    index: int,
    done: asyncio.Event,
    samples: list[RequestSample],
) -> None:
    """One background caller: requests back to back (unary) until ``done``."""
    if background is None or not background.specs:
        return
    position = index
    while not done.is_set():
        spec = background.specs[position % len(background.specs)]
        position += background.concurrency
        samples.append(await target.run(spec, False))


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
    for side in ("client", "server", "other"):
        used = getattr(cpu, f"{side}_cpu_s", None) if cpu is not None else None
        metrics[f"{side}_cpu_s"] = used
        metrics[f"{side}_cores_busy"] = used / result.wall_s if used is not None else None
    # Tokens per CPU-second of the process that ran the model (the server, or this process for
    # the in-process baseline): on a shared machine a cell may get less than the one core it
    # could use, and this normalisation is the cross-check that is insensitive to that.
    model_cpu_s = metrics["server_cpu_s"] if cpu and cpu.server_pid else metrics["client_cpu_s"]
    metrics["output_tokens_per_cpu_s"] = (
        metrics["output_tokens"] / model_cpu_s if model_cpu_s else None
    )
    metrics["load_average_1m"] = round(os.getloadavg()[0], 2)
    steps = result.steps
    metrics["queue_wait_steps"] = None
    if steps and steps["mean_step_ms"] > 0:
        waits = [s.queue_wait_ms / steps["mean_step_ms"] for s in ok if s.queue_wait_ms is not None]
        dist = distribution(waits)
        metrics["queue_wait_steps"] = dist.to_dict() if dist is not None else None
    if result.background:
        extra["background"] = summarize(result.background, result.wall_s, objective)
    return {
        **asdict(cell),
        "server_steps": steps,
        "metrics": metrics,
        # Raw per-request latencies (ms) for CDF plots; small enough to keep.
        "e2e_ms_values": [round(s.e2e_s * 1000.0, 3) for s in ok],
        "ttft_ms_values": [round(t * 1000.0, 3) for s in ok if (t := s.ttft_s) is not None],
        **extra,
    }
