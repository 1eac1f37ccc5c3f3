"""The server's own view of a cell: its Prometheus step histograms, scraped before and after.

peftserve runs with ``--metrics-address``; the difference of two scrapes around a cell says
how many model steps the cell took, how long a step took on average, and how many prompt
(prefill) and decode tokens went through the model per step. A queue wait divided by the mean
step time is the wait in steps, the unit the scheduler's targets are stated in.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["StepCounters", "scrape_steps", "step_delta"]

SCRAPE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StepCounters:
    """Running totals of the step histograms at one scrape."""

    steps: float = 0.0
    seconds: float = 0.0
    prefill_tokens: float = 0.0
    decode_tokens: float = 0.0
    rows: float = 0.0


def parse_steps(text: str) -> StepCounters:
    """The step totals in a Prometheus text exposition (zeros when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, sample.labels.get("phase", ""))] = sample.value

    def get(name: str, phase: str = "") -> float:
        return values.get((name, phase), 0.0)

    return StepCounters(
        steps=get("peftserve_engine_step_duration_seconds_count"),
        seconds=get("peftserve_engine_step_duration_seconds_sum"),
        prefill_tokens=get("peftserve_engine_step_tokens_sum", "prefill"),
        decode_tokens=get("peftserve_engine_step_tokens_sum", "decode"),
        rows=get("peftserve_engine_step_rows_sum"),
    )


def scrape_steps(port: int) -> StepCounters | None:
    """Scrape ``127.0.0.1:port/metrics``; None when it cannot be read."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S
        ) as response:
            return parse_steps(response.read().decode())
    except OSError:
        return None


def step_delta(before: StepCounters | None, after: StepCounters | None) -> dict[str, Any] | None:
    """What happened between two scrapes, JSON-ready; None without both or without steps."""
    if before is None or after is None:
        return None
    steps = after.steps - before.steps
    if steps <= 0:
        return None
    seconds = after.seconds - before.seconds
    prefill = after.prefill_tokens - before.prefill_tokens
    decode = after.decode_tokens - before.decode_tokens
    rows = after.rows - before.rows
    return {
        "steps": int(steps),
        "step_seconds": round(seconds, 4),
        "mean_step_ms": round(1000.0 * seconds / steps, 4),
        "prefill_tokens": int(prefill),
        "decode_tokens": int(decode),
        "prefill_tokens_per_step": round(prefill / steps, 3),
        "decode_tokens_per_step": round(decode / steps, 3),
        "mean_rows_per_step": round(rows / steps, 3),
    }
