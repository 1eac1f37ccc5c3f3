"""Metrics of one benchmark cell, computed from client samples (pure functions, no I/O).

Definitions (all over successful requests in the cell's wall-clock window, first start to last
end):

* request throughput: requests / wall time; output tokens/s: generated tokens / wall time.
* TTFT: send to first streamed message; TPOT: (end - first message) / (output tokens - 1),
  per streamed request; ITL: every gap between consecutive stream messages, pooled.
* end-to-end latency: send to last byte; queue wait: the server's ``timing.queue_wait_ms``.
* goodput: requests (and their tokens) per second that met the latency objective — end-to-end
  within ``e2e_ms`` and, for streams, TTFT within ``ttft_ms``.
* batch-size histogram: how many requests ran in a batch of each size, as the server logged it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .loadgen import RequestSample

__all__ = [
    "Distribution",
    "LatencyObjective",
    "batch_sizes_from_log",
    "distribution",
    "percentile",
    "summarize",
]


@dataclass(frozen=True)
class Distribution:
    """Summary statistics of one latency-like quantity (milliseconds unless named otherwise)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class LatencyObjective:
    """The service-level objective goodput is measured against."""

    ttft_ms: float = 1000.0
    e2e_ms: float = 10000.0

    def met_by(self, sample: RequestSample) -> bool:
        if not sample.ok or sample.e2e_s * 1000.0 > self.e2e_ms:
            return False
        ttft = sample.ttft_s
        return ttft is None or ttft * 1000.0 <= self.ttft_ms


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def distribution(values: Sequence[float]) -> Distribution | None:
    """Count, mean, p50/p90/p99, min and max; None when there are no values."""
    if not values:
        return None
    return Distribution(
        count=len(values),
        mean=sum(values) / len(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        min=min(values),
        max=max(values),
    )


def _dist_dict(values: Sequence[float]) -> dict[str, float | int] | None:
    dist = distribution(values)
    return dist.to_dict() if dist is not None else None


def inter_token_gaps_ms(sample: RequestSample) -> list[float]:
    """Gaps between consecutive stream messages of one request, in milliseconds."""
    times = sample.message_times_s
    return [(b - a) * 1000.0 for a, b in itertools.pairwise(times)]


def tpot_ms(sample: RequestSample) -> float | None:
    """Time per output token after the first, for a streamed request with >= 2 tokens."""
    ttft = sample.ttft_s
    if ttft is None or sample.output_tokens < 2:
        return None
    return (sample.e2e_s - ttft) * 1000.0 / (sample.output_tokens - 1)


def summarize(
    samples: Sequence[RequestSample], wall_s: float, objective: LatencyObjective
) -> dict[str, Any]:
    """Every metric of one cell as a JSON-ready dict."""
    ok = [s for s in samples if s.ok]
    wall_s = max(wall_s, 1e-9)
    output_tokens = sum(s.output_tokens for s in ok)
    good = [s for s in ok if objective.met_by(s)]
    ttfts = [t * 1000.0 for s in ok if (t := s.ttft_s) is not None]
    tpots = [t for s in ok if (t := tpot_ms(s)) is not None]
    gaps = [g for s in ok for g in inter_token_gaps_ms(s)]
    queue_waits = [s.queue_wait_ms for s in ok if s.queue_wait_ms is not None]
    batch_sizes = [s.batch_size for s in ok if s.batch_size is not None]
    histogram = Counter(batch_sizes)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(Counter(s.error or "unknown" for s in samples if not s.ok)),
        "wall_s": round(wall_s, 4),
        "output_tokens": output_tokens,
        "request_throughput_rps": len(ok) / wall_s,
        "output_tokens_per_s": output_tokens / wall_s,
        "goodput_rps": len(good) / wall_s,
        "goodput_tokens_per_s": sum(s.output_tokens for s in good) / wall_s,
        "goodput_fraction": len(good) / len(samples) if samples else 0.0,
        "objective": asdict(objective),
        "e2e_ms": _dist_dict([s.e2e_s * 1000.0 for s in ok]),
        "ttft_ms": _dist_dict(ttfts),
        "tpot_ms": _dist_dict(tpots),
        "itl_ms": _dist_dict(gaps),
        "queue_wait_ms": _dist_dict(queue_waits),
        "batch_size_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        "mean_batch_size": (sum(batch_sizes) / len(batch_sizes)) if batch_sizes else None,
    }


def batch_sizes_from_log(lines: Iterable[str]) -> dict[str, int]:
    """request_id -> batch size, from the server's JSON request log (``--log-format json``).

    The contract does not carry the batch size, but the server logs it on every request line
    (``GenerationResult.batch_size``); lines that are not JSON request lines are skipped.
    """
    sizes: dict[str, int] = {}
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        request_id = entry.get("request_id")
        size = entry.get("batch_size")
        if isinstance(request_id, str) and isinstance(size, int):
            sizes[request_id] = size
    return sizes


def attach_batch_sizes(samples: Iterable[RequestSample], sizes: dict[str, int]) -> int:
    """Fill ``batch_size`` of each sample from ``sizes``; returns how many were found."""
    found = 0
    for sample in samples:
        size = sizes.get(sample.request_id)
        if size is not None:
            sample.batch_size = size
            found += 1
    return found
