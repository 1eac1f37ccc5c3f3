"""Benchmark metrics on hand-made samples whose answers are known."""

from __future__ import annotations

import json

import pytest

from bench.loadgen import RequestSample, check_loopback
from bench.metrics import (
    LatencyObjective,
    attach_batch_sizes,
    batch_sizes_from_log,
    distribution,
    percentile,
    summarize,
)


def _stream(request_id: str, start: float, times: list[float], tokens: int) -> RequestSample:
    return RequestSample(
        request_id,
        "",
        True,
        start,
        end_s=times[-1],
        ok=True,
        output_tokens=tokens,
        message_times_s=times,
        queue_wait_ms=5.0,
    )


def test_percentile_interpolates() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution() -> None:
    dist = distribution([10.0, 30.0, 20.0])
    assert dist is not None
    assert (dist.count, dist.mean, dist.p50, dist.min, dist.max) == (3, 20.0, 20.0, 10.0, 30.0)
    assert distribution([]) is None


def test_summarize_streams() -> None:
    samples = [
        # TTFT 100 ms, then tokens every 50 ms: 3 tokens over 0.2 s.
        _stream("r1", 0.0, [0.1, 0.15, 0.2], 3),
        _stream("r2", 0.0, [0.3, 0.4], 2),
        RequestSample("r3", "", True, 0.5, end_s=0.6, ok=False, error="UNAVAILABLE"),
    ]
    m = summarize(samples, wall_s=1.0, objective=LatencyObjective(ttft_ms=200, e2e_ms=1000))
    assert (m["requests"], m["ok"], m["errors"]) == (3, 2, {"UNAVAILABLE": 1})
    assert m["output_tokens_per_s"] == pytest.approx(5.0)
    assert m["request_throughput_rps"] == pytest.approx(2.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert m["ttft_ms"]["min"] == pytest.approx(100.0)
    # ITL pools all gaps: 50, 50 (r1) and 100 (r2).
    assert m["itl_ms"]["count"] == 3
    assert m["itl_ms"]["max"] == pytest.approx(100.0)
    # TPOT of r1: (0.2 - 0.1) / 2 = 50 ms; of r2: (0.4 - 0.3) / 1 = 100 ms.
    assert m["tpot_ms"]["min"] == pytest.approx(50.0)
    assert m["tpot_ms"]["max"] == pytest.approx(100.0)
    # r2's TTFT (300 ms) misses the 200 ms objective; r3 failed.
    assert m["goodput_rps"] == pytest.approx(1.0)
    assert m["goodput_fraction"] == pytest.approx(1 / 3)
    assert m["queue_wait_ms"]["mean"] == pytest.approx(5.0)


def test_unary_samples_have_no_stream_metrics() -> None:
    sample = RequestSample("u", "upper", False, 0.0, end_s=0.5, ok=True, output_tokens=10)
    m = summarize([sample], wall_s=0.5, objective=LatencyObjective(e2e_ms=400))
    assert m["ttft_ms"] is None and m["itl_ms"] is None and m["tpot_ms"] is None
    assert m["e2e_ms"]["p50"] == pytest.approx(500.0)
    assert m["goodput_rps"] == 0.0


def test_batch_sizes_join_from_the_json_request_log() -> None:
    lines = [
        "not json at all",
        json.dumps({"message": "serving", "level": "INFO"}),
        json.dumps({"message": "request", "request_id": "a", "batch_size": 4}),
        json.dumps({"message": "request", "request_id": "b", "batch_size": 2}),
        "{broken json",
    ]
    sizes = batch_sizes_from_log(lines)
    assert sizes == {"a": 4, "b": 2}
    samples = [
        RequestSample("a", "", False, 0.0, end_s=1.0, ok=True, output_tokens=1),
        RequestSample("c", "", False, 0.0, end_s=1.0, ok=True, output_tokens=1),
    ]
    assert attach_batch_sizes(samples, sizes) == 1
    m = summarize(samples, 1.0, LatencyObjective())
    assert m["batch_size_histogram"] == {"4": 1}
    assert m["mean_batch_size"] == 4.0


def test_only_loopback_targets_are_allowed() -> None:
    check_loopback("127.0.0.1:50051")
    check_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError):
        check_loopback("10.0.0.5:50051")
    with pytest.raises(ValueError):
        check_loopback("http://example.com:80")
