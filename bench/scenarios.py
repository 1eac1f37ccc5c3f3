"""Benchmark scenarios beyond the main sweep: a registry of small functions, one per cell family.

A scenario is a function of a ``ScenarioContext`` (the run's settings, a running peftserve
server, and ``measure``/``record`` helpers) registered with ``@scenario``. By default it runs
against the shared batched server after the main sweep; with ``max_batch_size`` it gets a
peftserve server of its own, started and stopped around it (or the shared one, when that has
the same batch size, as in ``--quick``). Work that must not share the CPU
with any server (an in-process baseline) is deferred with ``ctx.after_servers``. To add a cell:
write the function here (or in a module imported by ``bench.run``), decorate it, and add a
``Target`` in ``bench/targets.py`` if it has one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .capacity import CancelReuseConfig, run_cancel_reuse, run_cancel_reuse_engine
from .cells import Background, Cell
from .loadgen import LoadConfig, PeftServeTarget
from .workload import RequestSpec, build_workload

if TYPE_CHECKING:
    from .run import Runner
    from .servers import ServerProcess

__all__ = ["SCENARIOS", "Scenario", "ScenarioContext", "scenario"]


@dataclass
class ScenarioContext:
    """What a scenario gets: the runner (settings, measuring, records) and its server."""

    runner: Runner
    server: ServerProcess
    address: str
    max_batch_size: int  # of this server

    @property
    def quick(self) -> bool:
        return bool(self.runner.s.args.quick)

    @property
    def args(self) -> Any:
        return self.runner.s.args

    def target(self) -> PeftServeTarget:
        return PeftServeTarget(self.address)

    def workload(self, count: int, **changes: Any) -> list[RequestSpec]:
        """``count`` requests of the run's workload, ``changes`` applied (mix, seed, ...)."""
        config = replace(self.runner.s.workload, num_requests=count, **changes)
        return build_workload(config, self.runner.s.adapters, self.runner.s.mixable)

    def measure(
        self,
        cell: Cell,
        specs: Sequence[RequestSpec],
        load: LoadConfig,
        background: Background | None = None,
        keep_tokens: bool = False,
    ) -> dict[str, Any]:
        """Measure ``cell`` on this server; ``keep_tokens`` adds each request's token count
        (``output_tokens_by_request``) to the record."""
        return self.runner.measure(
            cell, self.server, self.target, specs, load, background, keep_tokens
        )

    def record(self, name: str, record: dict[str, Any]) -> None:
        """Store a scenario's own record (``results["scenarios"][name]``)."""
        self.runner.scenario_records[name] = record

    def after_servers(self, fn: Callable[[], None]) -> None:
        self.runner.deferred.append(fn)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: Callable[[ScenarioContext], None]
    # None: the shared batched server; a number: a server of its own with that batch size.
    max_batch_size: int | None = None
    quick: bool = True  # part of --quick (with smaller sizes)


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, description: str, *, max_batch_size: int | None = None, quick: bool = True
) -> Callable[[Callable[[ScenarioContext], None]], Callable[[ScenarioContext], None]]:
    """Register the decorated function as the scenario ``name``."""

    def register(fn: Callable[[ScenarioContext], None]) -> Callable[[ScenarioContext], None]:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(name, description, fn, max_batch_size, quick)
        return fn

    return register


def _mixed(ctx: ScenarioContext) -> str:
    mix = str(ctx.runner.s.workload.adapter_mix)
    return mix if mix in ("uniform", "skewed", "mixable") else "uniform"


@scenario(
    "natural",
    "natural-length requests (end at EOS), mixed adapters incl. LoHa: batched server at "
    "--natural-concurrency vs the same requests one by one through PeftModel.generate",
)
def natural(ctx: ScenarioContext) -> None:
    clients = 2 if ctx.quick else ctx.args.natural_concurrency
    mix = _mixed(ctx)
    specs = ctx.workload(
        8 if ctx.quick else 6 * clients,
        adapter_mix=mix,
        natural=True,
        max_output_tokens=ctx.args.natural_max_tokens,
        min_output_tokens=1,
        id_prefix=f"natural-{mix}",
    )
    cell = Cell(
        id=f"peftserve-unary-{mix}-natural-c{clients}",
        baseline="natural",
        system="peftserve",
        label=f"peftserve batched, natural lengths, {clients} clients, unary",
        concurrency=clients,
        mode="closed",
        stream=False,
        adapter_mix=mix,
        scenario="natural",
        workload="natural",
    )
    record = ctx.measure(
        cell, specs, LoadConfig(concurrency=clients, duration_s=1e9), keep_tokens=True
    )
    served = record["output_tokens_by_request"]

    def one_by_one() -> None:
        serial = Cell(
            id=f"inprocess-unary-{mix}-natural-c1",
            baseline="natural",
            system="inprocess",
            label="in-process PeftModel.generate, natural lengths, one by one",
            concurrency=1,
            mode="closed",
            stream=False,
            adapter_mix=mix,
            scenario="natural",
            workload="natural",
        )
        alone = ctx.runner.run_inprocess_cell(serial, specs, keep_tokens=True)
        solo = alone["output_tokens_by_request"]
        same = sum(1 for rid, n in solo.items() if served.get(rid) == n)
        ctx.record(
            "natural",
            {
                "clients": clients,
                "requests": len(specs),
                "max_new_tokens": ctx.args.natural_max_tokens,
                # Greedy: the same requests give the same tokens batched or alone.
                "same_token_counts": same,
                "compared": len(solo),
                "cells": [cell.id, serial.id],
            },
        )

    ctx.after_servers(one_by_one)


@scenario(
    "poisson",
    "open-loop Poisson arrivals at each of --rates, streaming: TTFT / ITL p99 and goodput",
)
def poisson(ctx: ScenarioContext) -> None:
    rates = ctx.args.rates[:1] if ctx.quick else ctx.args.rates
    duration = 1.5 if ctx.quick else ctx.args.rate_duration_s
    mix = ctx.runner.s.workload.adapter_mix
    for rate in rates:
        # More than the window can start, so arrivals stop by time, never by running out.
        count = int(rate * duration * 1.5) + 8
        cell = Cell(
            id=f"peftserve-stream-{mix}-r{rate:g}",
            baseline="poisson",
            system="peftserve",
            label=f"peftserve batched, Poisson {rate:g} req/s, stream",
            concurrency=0,
            mode="open",
            stream=True,
            adapter_mix=mix,
            scenario="poisson",
            rate_rps=rate,
            series="Poisson arrivals, stream",
        )
        specs = ctx.workload(count, id_prefix=cell.id)
        load = LoadConfig(
            mode="open", rate_rps=rate, duration_s=duration, stream=True, seed=ctx.args.seed
        )
        ctx.measure(cell, specs, load)


@scenario(
    "beams",
    "streams at --beam-stream-clients, alone and next to closed-loop beam-search requests: "
    "the streams' inter-token latency",
)
def beams(ctx: ScenarioContext) -> None:
    clients = 2 if ctx.quick else ctx.args.beam_stream_clients
    beam_clients = 1 if ctx.quick else ctx.args.beam_clients
    mix = ctx.runner.s.workload.adapter_mix
    high = ctx.runner.s.output_tokens[1]
    background = Background(
        ctx.workload(
            64,
            num_beams=ctx.args.num_beams,
            min_output_tokens=high,
            max_output_tokens=high,
            seed=ctx.args.seed + 7,
            id_prefix="beams-background",
        ),
        concurrency=beam_clients,
    )
    for with_beams in (False, True):
        name = "with-beams" if with_beams else "no-beams"
        cell = Cell(
            id=f"peftserve-stream-{mix}-c{clients}-{name}",
            baseline="beams",
            system="peftserve",
            label=f"peftserve batched, {clients} streams"
            + (
                f" + {beam_clients} beam clients (num_beams={ctx.args.num_beams})"
                if with_beams
                else " alone"
            ),
            concurrency=clients,
            mode="closed",
            stream=True,
            adapter_mix=mix,
            scenario="beams",
            workload=name,
        )
        specs = ctx.workload(8 if ctx.quick else 8 * clients, id_prefix=cell.id)
        ctx.measure(
            cell,
            specs,
            LoadConfig(concurrency=clients, duration_s=1e9, stream=True),
            background if with_beams else None,
        )


@scenario(
    "cancel-reuse",
    "a full batch of 4 long streams, one queued request, one cancel: decode steps until the "
    "queued request runs, over gRPC (a neighbour's tokens) and in the engine (its step count)",
    max_batch_size=4,
)
def cancel_reuse(ctx: ScenarioContext) -> None:
    config = CancelReuseConfig(
        capacity=ctx.max_batch_size,
        neighbour_tokens=40 if ctx.quick else 200,
        trials=1 if ctx.quick else ctx.args.cancel_trials,
        warmup=not ctx.quick,
    )
    record = run_cancel_reuse(ctx.address, config, ctx.server.metrics_port)
    record["cell"] = f"cancel-reuse-c{config.capacity}"
    ctx.record("cancel-reuse", record)
    args = ctx.args

    def engine_steps() -> None:
        adapters_dir = args.adapters_dir if args.adapters_dir.is_dir() else None
        record["engine"] = run_cancel_reuse_engine(
            args.model_path, adapters_dir, config, args.torch_threads
        )

    # The engine in this process, once no server shares the CPU.
    ctx.after_servers(engine_steps)
