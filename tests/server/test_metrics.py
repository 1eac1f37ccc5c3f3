"""The Prometheus endpoint: scraped over HTTP from 127.0.0.1 after a few requests."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from peftserve.client import PeftServeClient, PeftServeClientError
from peftserve.client.requests import build_generate_request
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample, labels matched exactly; a missing one fails with what exists instead."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        present = sorted(str(dict(k[1])) for k in samples if k[0] == name)
        raise AssertionError(f"no sample {name}{labels}; present: {present}")
    return samples[key]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


NOT_FOUND_KEY = (
    "peftserve_requests_total",
    frozenset({"rpc": "Generate", "status": "NOT_FOUND", "adapter": "(unknown)"}.items()),
)


def scrape_when(port: int, key: tuple[str, frozenset[tuple[str, str]]]) -> Samples:
    """Scrape until ``key`` is present (at most 10 s).

    A failed call is recorded after ``abort_with_status`` has sent its status, so the caller
    can see the error a moment before the server has counted it.
    """
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(port)
        if key in samples or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_metrics_scrape_after_requests() -> None:
    server = ServerThread(metrics_address="127.0.0.1:0")
    try:
        server.wait_ready()
        port = server.server.metrics_port
        assert port
        with PeftServeClient(server.address, timeout_s=60) as client:
            adapters = client.list_adapters()
            before = scrape(port)
            client.generate("abc", adapter="upper", max_new_tokens=3)
            deltas = list(client.stream("abc", max_new_tokens=4))
            with pytest.raises(PeftServeClientError) as failure:
                client.generate("abc", adapter="no-such-adapter", max_new_tokens=3)
        samples = scrape_when(port, NOT_FOUND_KEY)
    finally:
        server.stop(grace_s=1.0)
    assert failure.value.code.name == "NOT_FOUND"
    assert deltas
    # Nothing had been generated at the first scrape: the counts below are these requests'.
    generation_rpcs = {("rpc", "Generate"), ("rpc", "StreamGenerate")}
    assert not any(
        name == "peftserve_requests_total" and labels & generation_rpcs for name, labels in before
    )

    requests = "peftserve_requests_total"
    assert value(samples, requests, rpc="Generate", status="OK", adapter="upper") == 1
    assert value(samples, requests, rpc="StreamGenerate", status="OK", adapter="") == 1
    assert value(samples, requests, rpc="ListAdapters", status="OK", adapter="") == 1
    # A caller-chosen unknown name never becomes a label value (unbounded series).
    assert value(samples, requests, rpc="Generate", status="NOT_FOUND", adapter="(unknown)") == 1
    assert not any("no-such-adapter" in dict(labels).values() for _, labels in samples)

    assert value(samples, "peftserve_completion_tokens_total", adapter="upper") == 3
    assert value(samples, "peftserve_completion_tokens_total", adapter="") == 4
    assert value(samples, "peftserve_prompt_tokens_total", adapter="upper") > 0
    assert value(samples, "peftserve_prompt_tokens_total", adapter="") > 0
    # The NOT_FOUND request never reached the engine: no tokens, no queue wait, no batch.
    assert ("peftserve_prompt_tokens_total", frozenset({("adapter", "(unknown)")})) not in samples

    # Histograms: one observation per generation that ran (two), TTFT for the stream only.
    assert value(samples, "peftserve_queue_wait_seconds_count") == 2
    assert value(samples, "peftserve_batch_size_count") == 2
    # Requests ran one at a time, so each batch held exactly one request.
    assert value(samples, "peftserve_batch_size_sum") == 2
    assert value(samples, "peftserve_batch_size_bucket", le="1.0") == 2
    assert value(samples, "peftserve_time_to_first_token_seconds_count") == 1
    assert 0 < value(samples, "peftserve_time_to_first_token_seconds_sum") < 60
    duration = "peftserve_request_duration_seconds_count"
    assert value(samples, duration, rpc="Generate") == 2
    assert value(samples, duration, rpc="StreamGenerate") == 1
    assert value(samples, "peftserve_request_duration_seconds_sum", rpc="Generate") > 0

    # Scrape-time gauges.
    assert value(samples, "peftserve_in_flight_requests", rpc="Generate") == 0
    assert value(samples, "peftserve_in_flight_requests", rpc="StreamGenerate") == 0
    assert value(samples, "peftserve_loaded_adapters") == len(adapters) == 3
    assert value(samples, "peftserve_adapters", state="ready") == len(adapters)
    assert value(samples, "peftserve_engine_queued_requests") == 0
    assert value(samples, "peftserve_engine_running_requests") == 0


def test_metrics_off_by_default(demo_server: ServerThread) -> None:
    assert demo_server.server.metrics is None
    assert demo_server.server.metrics_port is None


def scrape_until(port: int, done: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``done`` holds (at most 30 s); returns the last scrape either way."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def step_totals(samples: Samples) -> dict[str, float]:
    """The step histograms' counts and sums (0 before the first step)."""
    keys = {
        "steps": ("peftserve_engine_step_duration_seconds_count", {}),
        "seconds": ("peftserve_engine_step_duration_seconds_sum", {}),
        "prefill": ("peftserve_engine_step_tokens_sum", {"phase": "prefill"}),
        "prefill_steps": ("peftserve_engine_step_tokens_count", {"phase": "prefill"}),
        "decode": ("peftserve_engine_step_tokens_sum", {"phase": "decode"}),
        "rows": ("peftserve_engine_step_rows_sum", {}),
    }
    return {
        name: samples.get((sample, frozenset(labels.items())), 0.0)
        for name, (sample, labels) in keys.items()
    }


def test_running_batch_metrics_move_under_load() -> None:
    """Running rows and KV use rise while a stream runs and fall back after its cancel; every
    step of a request lands in the step histograms."""
    server = ServerThread(metrics_address="127.0.0.1:0")
    try:
        server.wait_ready()
        port = server.server.metrics_port
        assert port
        idle = scrape(port)
        assert value(idle, "peftserve_engine_running_rows") == 0
        assert value(idle, "peftserve_engine_kv_cache_used_tokens") == 0
        assert value(idle, "peftserve_engine_kv_cache_utilization") == 0
        budget = value(idle, "peftserve_engine_kv_cache_budget_tokens")
        assert budget > 0
        with PeftServeClient(server.address, timeout_s=60) as client:
            # Far longer than a scrape: the request is still running when the scrape lands,
            # and it ends by our cancel, not by itself.
            stream = client.stream("abc", max_new_tokens=400, min_new_tokens=400)
            assert next(stream)
            busy = scrape(port)
            stream.close()
            after_cancel = scrape_until(
                port, lambda s: value(s, "peftserve_engine_running_rows") == 0
            )
            before = step_totals(after_cancel)
            output = client.generate("hello world", max_new_tokens=5, min_new_tokens=5)
        after = scrape(port)
    finally:
        server.stop(grace_s=1.0)

    assert value(busy, "peftserve_engine_running_rows") >= 1
    used = value(busy, "peftserve_engine_kv_cache_used_tokens")
    assert 0 < used <= budget
    assert value(busy, "peftserve_engine_kv_cache_utilization") == pytest.approx(used / budget)
    assert value(after_cancel, "peftserve_engine_kv_cache_used_tokens") == 0
    assert value(after_cancel, "peftserve_engine_kv_cache_utilization") == 0
    # The cancelled stream's steps were recorded: at least the one that sent its first token.
    assert step_totals(busy)["steps"] >= 1

    delta = {k: v - before[k] for k, v in step_totals(after).items()}
    tokens = output.completion_tokens
    assert tokens == 5
    # One step per generated token at least (a prefill may take several chunks); the prompt
    # went through the model once; every later token came from a decode row.
    assert delta["steps"] >= tokens
    assert delta["prefill_steps"] == delta["steps"]  # both phases are observed every step
    assert delta["prefill"] >= output.prompt_tokens
    assert delta["decode"] >= tokens - 1
    assert delta["rows"] >= delta["decode"]
    assert delta["seconds"] > 0


# ---- The inference extension's model-server protocol (issue 12) ----
IE_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def lora_info(samples: Samples) -> dict[str, str]:
    """The labels of the single ``vllm:lora_requests_info`` sample."""
    (labels,) = [dict(k[1]) for k in samples if k[0] == "vllm:lora_requests_info"]
    return labels


def adapter_list(text: str) -> set[str]:
    return set(text.split(",")) if text else set()


def test_inference_extension_metrics_follow_the_running_batch() -> None:
    """The protocol's gauges under their documented names move with real load, and the adapter
    labels name exactly the adapters of the running and of the waiting requests."""
    server = ServerThread(
        metrics_address="127.0.0.1:0",
        max_batch_size=2,
        max_wait_ms=200,
        max_loaded_adapters=5,
        engine_process=False,  # the step listener below must run on the worker thread
    )
    # Slow every model step down (on the worker thread, through the public step listener) so
    # the states below last far longer than a scrape on any machine; nothing is timed.
    slow = threading.Event()
    slow.set()
    try:
        server.wait_ready()
        port = server.server.metrics_port
        assert port
        engine = server.server.engine()
        engine.add_step_listener(lambda _step: time.sleep(0.02) if slow.is_set() else None)
        model = engine.info.model_id
        idle = scrape(port)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            def start(adapter: str) -> grpc.Future:
                request = build_generate_request(
                    "abc", adapter=adapter, max_new_tokens=400, min_new_tokens=400
                )
                return stub.Generate.future(request, timeout=120)

            # Two long requests fill the batch (max_batch_size=2); the third has to wait.
            running = [start("upper"), start("reverse")]
            scrape_until(
                port, lambda s: value(s, "vllm:num_requests_running", model_name=model) == 2
            )
            waiting = start("title")
            busy = scrape_until(
                port, lambda s: value(s, "vllm:num_requests_waiting", model_name=model) == 1
            )
            for call in running:
                call.cancel()
            # The waiting request takes the freed batch: it is now the running one.
            promoted = scrape_until(
                port, lambda s: lora_info(s)["running_lora_adapters"] == "title"
            )
            waiting.cancel()
            drained = scrape_until(
                port, lambda s: value(s, "vllm:num_requests_running", model_name=model) == 0
            )
    finally:
        slow.clear()
        server.stop(grace_s=1.0)

    for name in IE_GAUGES:
        assert value(idle, name, model_name=model) == 0
    assert lora_info(idle) == {
        "running_lora_adapters": "",
        "waiting_lora_adapters": "",
        "max_lora": "5",
    }
    # Under load: the same numbers as the native gauges, under the protocol's names.
    assert value(busy, "vllm:num_requests_running", model_name=model) == 2
    assert value(busy, "vllm:num_requests_waiting", model_name=model) == 1
    assert value(busy, "peftserve_engine_running_requests") == 2
    assert value(busy, "peftserve_engine_queued_requests") == 1
    kv = value(busy, "vllm:kv_cache_usage_perc", model_name=model)
    assert 0 < kv <= 1
    assert kv == pytest.approx(value(busy, "peftserve_engine_kv_cache_utilization"))
    assert value(busy, "vllm:gpu_cache_usage_perc", model_name=model) == kv
    info = lora_info(busy)
    assert adapter_list(info["running_lora_adapters"]) == {"upper", "reverse"}
    assert adapter_list(info["waiting_lora_adapters"]) == {"title"}
    assert info["max_lora"] == "5"
    # The value is the reading's Unix time: the protocol's readers keep the newest sample.
    assert abs(value(busy, "vllm:lora_requests_info", **info) - time.time()) < 120
    assert lora_info(promoted)["waiting_lora_adapters"] == ""
    assert value(promoted, "vllm:num_requests_running", model_name=model) == 1
    assert value(promoted, "vllm:num_requests_waiting", model_name=model) == 0
    assert value(drained, "vllm:kv_cache_usage_perc", model_name=model) == 0
    assert lora_info(drained)["running_lora_adapters"] == ""


def test_max_lora_without_a_budget_is_the_adapters_held() -> None:
    from peftserve.server.metrics import ie_max_lora

    server = ServerThread()
    try:
        server.wait_ready()
        engine = server.server.engine()
        assert engine.registry.max_loaded == 0
        assert ie_max_lora(engine) == len(engine.adapters()) == 3
    finally:
        server.stop(grace_s=1.0)
