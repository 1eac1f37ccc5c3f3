"""The Prometheus endpoint: scraped over HTTP from 127.0.0.1 after a few requests."""

from __future__ import annotations

import re
import urllib.request

import pytest
from peftserve.client import PeftServeClient, PeftServeClientError

from ..conftest import ServerThread

pytest.importorskip("prometheus_client")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample line, labels matched exactly (order as exposed)."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if found == labels:
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{labels}")


def test_metrics_scrape_after_requests() -> None:
    server = ServerThread(metrics_address="127.0.0.1:0")
    try:
        server.wait_ready()
        with PeftServeClient(server.address, timeout_s=60) as client:
            client.generate("abc", adapter="upper", max_new_tokens=3)
            "".join(client.stream("abc", max_new_tokens=4))
            with pytest.raises(PeftServeClientError):
                client.generate("abc", adapter="no-such-adapter", max_new_tokens=3)
        port = server.server.metrics_port
        assert port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop(grace_s=1.0)
    labels = {"rpc": "Generate", "status": "OK", "adapter": "upper"}
    assert sample(text, "peftserve_requests_total", **labels) == 1
    assert (
        sample(text, "peftserve_requests_total", rpc="StreamGenerate", status="OK", adapter="") == 1
    )
    # A caller-chosen unknown name never becomes a label value.
    assert (
        sample(
            text,
            "peftserve_requests_total",
            rpc="Generate",
            status="NOT_FOUND",
            adapter="(unknown)",
        )
        == 1
    )
    assert "no-such-adapter" not in text
    assert sample(text, "peftserve_completion_tokens_total", adapter="upper") == 3
    assert sample(text, "peftserve_prompt_tokens_total", adapter="") > 0
    assert sample(text, "peftserve_queue_wait_seconds_count") == 2
    assert sample(text, "peftserve_time_to_first_token_seconds_count") == 1
    assert sample(text, "peftserve_batch_size_count") == 2
    assert sample(text, "peftserve_in_flight_requests", rpc="Generate") == 0
    assert sample(text, "peftserve_adapters", state="ready") >= 2
    assert sample(text, "peftserve_engine_queued_requests") == 0
