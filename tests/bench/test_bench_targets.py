"""Targets and step counters on hand-made results whose answers are known."""

from __future__ import annotations

from typing import Any

import pytest

from bench.server_metrics import StepCounters, parse_steps, step_delta
from bench.targets import TARGETS, evaluate, find_cell


def _cell(cell_id: str, tokens_per_s: float, **fields: Any) -> dict[str, Any]:
    cell = {
        "id": cell_id,
        "system": "peftserve",
        "adapter_mix": "uniform",
        "concurrency": 64,
        "stream": False,
        "mode": "closed",
        "scenario": "",
        "workload": "exact",
        "server_steps": None,
        **fields,
    }
    cell.setdefault("metrics", {})
    cell["metrics"] = {"ok": 10, "output_tokens_per_s": tokens_per_s, **cell["metrics"]}
    return cell


def _results(cells: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    meta = {"concurrency": [1, 64], "adapter_mix": "uniform"}
    return {"meta": meta, "cells": cells, "scenarios": {}, "profile": None, **extra}


def _rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in evaluate(results)}


def test_find_cell_keeps_scenarios_apart_from_the_main_sweep() -> None:
    main = _cell("main", 100.0)
    natural = _cell("nat", 50.0, scenario="natural", concurrency=16)
    cells = [natural, main]
    assert find_cell(cells, system="peftserve", adapter_mix="uniform") is main
    assert find_cell(cells, system="peftserve", scenario="natural") is natural
    assert find_cell(cells, system="inprocess") is None


def test_ratio_targets_are_met_or_missed_by_their_bound() -> None:
    cells = [
        _cell("unary", 1000.0),
        _cell("stream", 850.0, stream=True),  # 0.85 < 0.9: missed
        _cell("single", 1000.0, adapter_mix="single"),  # mixed / single = 1.0: met
        _cell("base-64", 3000.0, adapter_mix="base", metrics={"output_tokens_per_cpu_s": 900.0}),
        _cell(
            "ts-64",
            1000.0,
            system="transformers-serve",
            adapter_mix="base",
            metrics={"output_tokens_per_cpu_s": 600.0},
        ),
        _cell("base-1", 110.0, adapter_mix="base", concurrency=1),
        _cell("ts-1", 100.0, system="transformers-serve", adapter_mix="base", concurrency=1),
    ]
    rows = _rows(_results(cells))
    assert rows["StreamGenerate vs Generate"]["value"] == pytest.approx(0.85)
    assert rows["StreamGenerate vs Generate"]["met"] is False
    assert rows["mixed adapters vs single adapter"]["met"] is True
    assert rows["vs transformers serve, 64 clients"]["value"] == pytest.approx(3.0)
    assert rows["vs transformers serve, 64 clients"]["met"] is True
    assert rows["vs transformers serve, 64 clients"]["cells"] == ["base-64", "ts-64"]
    # The CPU-normalised cross-check, where both cells recorded their CPU time.
    assert rows["vs transformers serve, 64 clients"]["per_cpu_value"] == pytest.approx(1.5)
    assert rows["StreamGenerate vs Generate"]["per_cpu_value"] is None
    assert rows["vs transformers serve, 1 client"]["value"] == pytest.approx(1.1)
    assert rows["vs transformers serve, 1 client"]["met"] is False
    # Nothing measured the natural workload: not measured, neither met nor missed.
    assert rows["natural lengths vs one by one"]["value"] is None
    assert rows["natural lengths vs one by one"]["met"] is None


def test_step_targets_read_the_queue_wait_the_cancel_record_and_the_profile() -> None:
    steps = {"mean_step_ms": 10.0}
    main = _cell(
        "unary",
        1.0,
        server_steps=steps,
        metrics={"queue_wait_ms": {"p50": 25.0}, "queue_wait_steps": {"p50": 2.5}},
    )
    results = _results(
        [main],
        scenarios={
            "cancel-reuse": {
                "cell": "cancel-reuse-c4",
                "steps_max": 4,
                "steps_median": 2,
                "ms_median": 20.0,
                "valid_trials": 5,
            }
        },
        profile={
            "cell": "profiled",
            "summary": {
                "worker": {
                    "engine_python_percent": 12.5,
                    "engine_python_samples": 125,
                    "samples": 1000,
                }
            },
        },
    )
    rows = _rows(results)
    assert rows["queue wait p50 in steps"]["value"] == 2.5
    assert rows["queue wait p50 in steps"]["met"] is True
    # The worst trial counts: one slow reuse is a miss.
    assert rows["cancel -> queued request starts"]["value"] == 4
    assert rows["cancel -> queued request starts"]["met"] is False
    assert rows["engine Python share of worker time"]["value"] == 12.5
    assert rows["engine Python share of worker time"]["met"] is True


def test_every_target_has_a_unique_name_and_a_known_operator() -> None:
    names = [t.name for t in TARGETS]
    assert len(names) == len(set(names))
    assert all(t.op in (">=", "<=") for t in TARGETS)


EXPOSITION = """\
# TYPE peftserve_engine_step_duration_seconds histogram
peftserve_engine_step_duration_seconds_count 40.0
peftserve_engine_step_duration_seconds_sum 0.2
# TYPE peftserve_engine_step_tokens histogram
peftserve_engine_step_tokens_count{phase="prefill"} 40.0
peftserve_engine_step_tokens_sum{phase="prefill"} 120.0
peftserve_engine_step_tokens_count{phase="decode"} 40.0
peftserve_engine_step_tokens_sum{phase="decode"} 160.0
# TYPE peftserve_engine_step_rows histogram
peftserve_engine_step_rows_count 40.0
peftserve_engine_step_rows_sum 160.0
"""


def test_step_counters_from_an_exposition_and_their_difference() -> None:
    after = parse_steps(EXPOSITION)
    assert after == StepCounters(
        steps=40, seconds=0.2, prefill_tokens=120, decode_tokens=160, rows=160
    )
    before = StepCounters(steps=20, seconds=0.1, prefill_tokens=100, decode_tokens=80, rows=80)
    delta = step_delta(before, after)
    assert delta is not None
    assert delta["steps"] == 20
    assert delta["mean_step_ms"] == pytest.approx(5.0)
    assert delta["prefill_tokens_per_step"] == pytest.approx(1.0)
    assert delta["decode_tokens_per_step"] == pytest.approx(4.0)
    assert delta["mean_rows_per_step"] == pytest.approx(4.0)
    # No steps in between, or a scrape that failed: nothing to say.
    assert step_delta(after, after) is None
    assert step_delta(None, after) is None
    assert parse_steps("") == StepCounters()
