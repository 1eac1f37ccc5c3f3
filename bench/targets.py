"""The targets a run is judged against: a registry of pure functions of the results JSON.

Each ``Target`` names one number and its bound; ``measure`` reads it from the finished results
(cells, scenario records, profile) and returns None when the run did not produce it (quick mode,
a skipped baseline). A new cell with a target of its own adds one ``Target`` to ``TARGETS``.
Issue 11's targets come first; the older ratios of issue 6 stay as informational rows
(``informational=True``: reported, never counted as met or missed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TARGETS", "Measured", "Target", "evaluate", "find_cell"]

Results = dict[str, Any]


@dataclass(frozen=True)
class Measured:
    """A target's measured value and where it came from (cells or scenario, in words)."""

    value: float
    detail: str
    cells: tuple[str, ...] = ()
    # The same ratio over tokens per CPU-second of the model process: a cross-check for a
    # shared machine, where a cell may get less CPU than its partner.
    per_cpu_value: float | None = None


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    op: str  # ">=" or "<="
    bound: float
    measure: Callable[[Results], Measured | None]
    unit: str = "×"
    informational: bool = False

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


def find_cell(cells: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first cell whose fields equal ``match``; cells of a scenario only when it is named
    (``scenario=""``, the main sweep, by default) and closed-loop unless ``mode`` is given."""
    match = {"scenario": "", **match}
    for cell in cells:
        if all(cell.get(k, "" if k == "scenario" else None) == v for k, v in match.items()):
            return cell
    return None


def _top(results: Results) -> int:
    return max(results["meta"]["concurrency"])


def _low(results: Results) -> int:
    return min(results["meta"]["concurrency"])


def _tokens_per_s(cell: dict[str, Any]) -> float:
    return float(cell["metrics"]["output_tokens_per_s"])


def throughput_ratio(
    num: Callable[[Results], dict[str, Any]], den: Callable[[Results], dict[str, Any]]
) -> Callable[[Results], Measured | None]:
    """Output tokens/s of the cell ``num`` matches over that of ``den``."""

    def measure(results: Results) -> Measured | None:
        cells = results["cells"]
        a, b = find_cell(cells, **num(results)), find_cell(cells, **den(results))
        if a is None or b is None or _tokens_per_s(b) <= 0 or a["metrics"]["ok"] == 0:
            return None
        per_cpu = None
        cpu_a = a["metrics"].get("output_tokens_per_cpu_s")
        cpu_b = b["metrics"].get("output_tokens_per_cpu_s")
        if cpu_a and cpu_b:
            per_cpu = cpu_a / cpu_b
        return Measured(
            _tokens_per_s(a) / _tokens_per_s(b),
            f"{_tokens_per_s(a):,.1f} / {_tokens_per_s(b):,.1f} output tok/s",
            (a["id"], b["id"]),
            per_cpu,
        )

    return measure


def _main(results: Results, **extra: Any) -> dict[str, Any]:
    return {"system": "peftserve", "adapter_mix": results["meta"]["adapter_mix"], **extra}


def _mixed(results: Results) -> str:
    mix = results["meta"]["adapter_mix"]
    return mix if mix in ("uniform", "skewed", "mixable") else "uniform"


def _queue_wait_steps(results: Results) -> Measured | None:
    cell = find_cell(results["cells"], **_main(results, concurrency=_top(results), stream=False))
    if cell is None:
        return None
    steps = cell["metrics"].get("queue_wait_steps")
    server = cell.get("server_steps")
    if not steps or not server:
        return None
    return Measured(
        float(steps["p50"]),
        f"queue wait p50 {cell['metrics']['queue_wait_ms']['p50']:.1f} ms / mean step "
        f"{server['mean_step_ms']:.2f} ms",
        (cell["id"],),
    )


def _cancel_reuse(results: Results) -> Measured | None:
    """The engine's own step count when it was measured, else the count over gRPC."""
    record = (results.get("scenarios") or {}).get("cancel-reuse")
    if not record:
        return None
    engine = record.get("engine") or {}
    over_grpc = ""
    if record.get("steps_max") is not None:
        over_grpc = (
            f"over gRPC: worst {record['steps_max']}, median {record['steps_median']} "
            f"neighbour tokens, {record['ms_median']:.1f} ms median"
        )
    if engine.get("steps_max") is not None:
        return Measured(
            float(engine["steps_max"]),
            f"engine steps, worst of {engine['valid_trials']} trials (median "
            f"{engine['steps_median']}); {over_grpc or 'not measured over gRPC'}",
            (record["cell"],),
        )
    if not over_grpc:
        return None
    return Measured(float(record["steps_max"]), over_grpc, (record["cell"],))


def _engine_python(results: Results) -> Measured | None:
    profile = results.get("profile") or {}
    worker = (profile.get("summary") or {}).get("worker")
    if not worker:
        return None
    return Measured(
        float(worker["engine_python_percent"]),
        f"{worker['engine_python_samples']} of {worker['samples']} worker-thread samples "
        "outside the model forward",
        (profile["cell"],),
    )


TARGETS: list[Target] = [
    Target(
        "vs transformers serve, 64 clients",
        "peftserve / `transformers serve --continuous-batching`, base model, top concurrency",
        ">=",
        2.0,
        throughput_ratio(
            lambda r: {"system": "peftserve", "adapter_mix": "base", "concurrency": _top(r)},
            lambda r: {"system": "transformers-serve", "concurrency": _top(r)},
        ),
    ),
    Target(
        "vs transformers serve, 1 client",
        "peftserve / `transformers serve --continuous-batching`, base model, one client",
        ">=",
        1.2,
        throughput_ratio(
            lambda r: {"system": "peftserve", "adapter_mix": "base", "concurrency": _low(r)},
            lambda r: {"system": "transformers-serve", "concurrency": _low(r)},
        ),
    ),
    Target(
        "natural lengths vs one by one",
        "natural-length requests (end at EOS), mixed adapters incl. LoHa, batched server at "
        "the natural concurrency / the same requests one by one through `PeftModel.generate`",
        ">=",
        6.0,
        throughput_ratio(
            lambda r: {"system": "peftserve", "scenario": "natural"},
            lambda r: {"system": "inprocess", "scenario": "natural"},
        ),
    ),
    Target(
        "StreamGenerate vs Generate",
        "batched streaming / batched unary, top concurrency",
        ">=",
        0.9,
        throughput_ratio(
            lambda r: _main(r, concurrency=_top(r), stream=True),
            lambda r: _main(r, concurrency=_top(r), stream=False),
        ),
    ),
    Target(
        "mixed adapters vs single adapter",
        "adapter mix (incl. LoHa) / one LoRA adapter, batched unary, top concurrency",
        ">=",
        0.9,
        throughput_ratio(
            lambda r: {
                "system": "peftserve",
                "adapter_mix": _mixed(r),
                "concurrency": _top(r),
                "stream": False,
            },
            lambda r: {"system": "peftserve", "adapter_mix": "single", "concurrency": _top(r)},
        ),
    ),
    Target(
        "queue wait p50 in steps",
        "queue wait p50 / mean step time of the same cell, batched unary, top concurrency",
        "<=",
        3.0,
        _queue_wait_steps,
        unit=" steps",
    ),
    Target(
        "cancel -> queued request starts",
        "decode steps of a running neighbour between a cancel at full capacity and the "
        "queued request's first token",
        "<=",
        3.0,
        _cancel_reuse,
        unit=" steps",
    ),
    Target(
        "engine Python share of worker time",
        "py-spy: worker-thread samples outside the model forward (scheduling, sampling, "
        "detokenizing, generate's loop), batched unary, top concurrency",
        "<=",
        15.0,
        _engine_python,
        unit="%",
    ),
    # Issue 6's ratios, kept for comparison with earlier reference runs.
    Target(
        "c/b (issue 6)",
        "batched / `--max-batch-size 1`, top concurrency",
        ">=",
        8.0,
        throughput_ratio(
            lambda r: _main(r, concurrency=_top(r), stream=False),
            lambda r: {"system": "peftserve-b1", "concurrency": _top(r)},
        ),
        informational=True,
    ),
    Target(
        "b/a (issue 6)",
        "`--max-batch-size 1` server / in-process `generate`, one client",
        ">=",
        0.85,
        throughput_ratio(
            lambda r: {"system": "peftserve-b1", "concurrency": _low(r)},
            lambda r: {"system": "inprocess"},
        ),
        informational=True,
    ),
    Target(
        "mixable adapters vs single adapter",
        "plain-LoRA adapters only (they share every step) / one adapter, top concurrency",
        ">=",
        0.9,
        throughput_ratio(
            lambda r: {
                "system": "peftserve",
                "adapter_mix": "mixable",
                "concurrency": _top(r),
                "stream": False,
            },
            lambda r: {"system": "peftserve", "adapter_mix": "single", "concurrency": _top(r)},
        ),
        informational=True,
    ),
]


def evaluate(results: Results, targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Every target's JSON row: measured value (None when not measured) and whether it is met."""
    rows = []
    for target in targets:
        measured = target.measure(results)
        rows.append(
            {
                "name": target.name,
                "description": target.description,
                "op": target.op,
                "target": target.bound,
                "unit": target.unit,
                "informational": target.informational,
                "value": None if measured is None else measured.value,
                "per_cpu_value": None if measured is None else measured.per_cpu_value,
                "met": None if measured is None else target.met(measured.value),
                "detail": "" if measured is None else measured.detail,
                "cells": [] if measured is None else list(measured.cells),
            }
        )
    return rows
