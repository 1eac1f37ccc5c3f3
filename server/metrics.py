"""Prometheus metrics on their own HTTP port (``--metrics-address``; off by default).

Everything per request is recorded once, when the RPC ends, from the interceptor's
``RequestRecord`` (status, adapter, tokens, durations, queue wait, batch size, time to first
token), so the engine's decoding loop carries no metrics code. Gauges that describe the present
(in-flight RPCs, engine queue, loaded adapters, adapters by state) are read at scrape time. Each
server has its own ``CollectorRegistry``: several servers in one process (tests) never share
counters.

The running batch (issue 11) has its own section below, ``_BatchCollector`` and
``_StepMetrics``: running rows and KV-cache use read from ``Engine.stats()`` at scrape time,
and per-step histograms (step time, prefill and decode tokens, rows) fed by the engine's step
listener once the engine has loaded.

The inference extension's model-server protocol (issue 12) has its own section at the end,
``_InferenceExtensionCollector``: the queue, running requests, KV-cache use and adapters under
the names its endpoint picker scrapes (``vllm:*``), next to the peftserve-native ones.

The endpoint is plain HTTP without auth: bind it to loopback or a private network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine_proc import AnyEngine
from .interceptor import RequestRecord

if TYPE_CHECKING:
    from .engine import StepStats

__all__ = ["ServerMetrics"]

logger = logging.getLogger("peftserve.metrics")

# Request metrics label the adapter only when the server knows it: names in failed requests
# are caller-chosen, and each distinct label value is a new time series.
UNKNOWN_ADAPTER_LABEL = "(unknown)"
BASE_MODEL_LABEL = ""
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _EngineCollector(Collector):
    """Scrape-time gauges read from the engine (absent while it loads)."""

    def __init__(self, engine: Callable[[], AnyEngine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self._engine()
        if engine is None:
            return
        stats = engine.stats()
        queued = GaugeMetricFamily(
            "peftserve_engine_queued_requests", "Requests waiting in the queue"
        )
        queued.add_metric([], stats.queued)
        yield queued
        running = GaugeMetricFamily(
            "peftserve_engine_running_requests", "Requests in the running batch"
        )
        running.add_metric([], stats.running)
        yield running
        loaded = GaugeMetricFamily(
            "peftserve_loaded_adapters", "Adapters requests may name now (state ready)"
        )
        loaded.add_metric([], len(engine.adapters()))
        yield loaded
        adapters = GaugeMetricFamily(
            "peftserve_adapters", "Known adapters by lifecycle state", labels=["state"]
        )
        for state, count in engine.registry.count_by_state().items():
            adapters.add_metric([state.value], count)
        yield adapters


class ServerMetrics:
    """The server's metrics and, once ``start`` ran, the HTTP endpoint serving them."""

    def __init__(self, engine: Callable[[], AnyEngine | None]) -> None:
        self._engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "peftserve_requests",
            "Finished RPCs by method, final status and adapter",
            ["rpc", "status", "adapter"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "peftserve_prompt_tokens", "Prompt tokens of finished requests", ["adapter"], registry=r
        )
        self.completion_tokens = Counter(
            "peftserve_completion_tokens",
            "Generated tokens of finished requests",
            ["adapter"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "peftserve_queue_wait_seconds",
            "Time from admission until the request's batch started",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "peftserve_time_to_first_token_seconds",
            "StreamGenerate: time from the call's start to the first message with tokens",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "peftserve_request_duration_seconds",
            "Time from the call's arrival to its final status, by method",
            ["rpc"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "peftserve_batch_size",
            "Requests in the batch each finished request ran in",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "peftserve_in_flight_requests", "RPCs being handled now", ["rpc"], registry=r
        )
        r.register(_EngineCollector(engine))
        r.register(_BatchCollector(engine))
        r.register(_InferenceExtensionCollector(engine))
        self.steps = _StepMetrics(r)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def engine_ready(self, engine: AnyEngine) -> None:
        """Start recording the engine's steps (called once the engine has loaded)."""
        self.steps.attach(engine)

    # ---- RequestObserver (interceptor.py), called on the event loop ----
    def started(self, entry: RequestRecord) -> None:
        self.in_flight.labels(entry.method).inc()

    def finished(self, entry: RequestRecord, status: str) -> None:
        self.in_flight.labels(entry.method).dec()
        adapter = self._adapter_label(entry.adapter)
        self.requests.labels(entry.method, status, adapter).inc()
        self.request_duration.labels(entry.method).observe(time.perf_counter() - entry.started_s)
        ttft_ms = entry.extra.get("ttft_ms")
        if ttft_ms is not None:
            # Before the result check: a stream cancelled after its first token still had one.
            self.ttft.observe(float(ttft_ms) / 1000.0)
        if "batch_size" not in entry.extra:
            return  # no generation result: nothing ran
        self.prompt_tokens.labels(adapter).inc(entry.prompt_tokens)
        self.completion_tokens.labels(adapter).inc(entry.completion_tokens)
        self.queue_wait.observe(entry.queue_wait_ms / 1000.0)
        self.batch_size.observe(float(entry.extra["batch_size"]))

    def _adapter_label(self, name: str) -> str:
        if not name:
            return BASE_MODEL_LABEL
        engine = self._engine()
        known = engine is not None and engine.registry.entry(name) is not None
        return name if known else UNKNOWN_ADAPTER_LABEL

    # ---- HTTP endpoint ----
    def start(self, address: str) -> int:
        """Serve ``/metrics`` on ``address`` ("host:port", port 0 = any); returns the port."""
        host, _, port = address.rpartition(":")
        httpd, thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        self._httpd, self._thread = httpd, thread
        self.port = int(httpd.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        self.steps.detach()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


# ---- The running batch: rows, KV cache and steps (issue 11) ----
# A step is one forward over the running rows; on this CPU demo model one takes about a
# millisecond, on a large model tens of milliseconds, hence the range.
_STEP_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.5,
)
# Tokens of one phase in one step: 0 (a decode-only step has no prefill), then powers of two up
# to a long chunked prefill.
_STEP_TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STEP_PHASES = ("prefill", "decode")


class _BatchCollector(Collector):
    """Scrape-time gauges of the running batch and its KV cache (absent while loading)."""

    def __init__(self, engine: Callable[[], AnyEngine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self._engine()
        if engine is None:
            return
        stats = engine.stats()
        gauges = (
            (
                "peftserve_engine_running_rows",
                "Model rows (sequences, beams) in the running batch",
                stats.running_rows,
            ),
            (
                "peftserve_engine_kv_cache_used_tokens",
                "KV-cache tokens held by running requests",
                stats.kv_tokens_used,
            ),
            (
                "peftserve_engine_kv_cache_budget_tokens",
                "KV-cache tokens requests are admitted against",
                stats.kv_tokens_budget,
            ),
            (
                "peftserve_engine_kv_cache_utilization",
                "KV-cache tokens used as a fraction of the budget (0 to 1)",
                stats.kv_cache_utilization,
            ),
        )
        for name, documentation, number in gauges:
            gauge = GaugeMetricFamily(name, documentation)
            gauge.add_metric([], float(number))
            yield gauge


class _StepMetrics:
    """Histograms of the engine's model steps, fed by its step listener on the worker thread.

    prometheus_client's histograms take their own lock, so observing from the worker thread
    while the HTTP thread scrapes is safe; an observation costs a few microseconds per step.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "peftserve_engine_step_duration_seconds",
            "Wall time of one model step over the running batch",
            buckets=_STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.tokens = Histogram(
            "peftserve_engine_step_tokens",
            "Tokens through the model in one step, by phase: prompt tokens prefilled, rows "
            "decoded (every step observes both phases, so each _count is the number of steps)",
            ["phase"],
            buckets=_STEP_TOKEN_BUCKETS,
            registry=registry,
        )
        self.rows = Histogram(
            "peftserve_engine_step_rows",
            "Model rows in one step's forward",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        # Children resolved once: the listener runs every step.
        self._prefill = self.tokens.labels("prefill")
        self._decode = self.tokens.labels("decode")
        self._unsubscribe: Callable[[], None] | None = None

    def attach(self, engine: AnyEngine) -> None:
        self.detach()
        self._unsubscribe = engine.add_step_listener(self.observe)

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def observe(self, step: StepStats) -> None:
        self.duration.observe(step.seconds)
        self._prefill.observe(step.prefill_tokens)
        self._decode.observe(step.decode_tokens)
        self.rows.observe(step.rows)


# ---- The inference extension's model-server protocol (issue 12) ----
# The Gateway API Inference Extension's endpoint picker (and llm-d's) route by scraping these
# names, which its "model server protocol" (proposal 003) documents as vLLM's; it reads them by
# default, so speaking them makes a peftserve pod routable with no configuration of ours. They
# repeat peftserve-native gauges under the protocol's names and types. docs/deploy.md says what
# each one means here.
IE_QUEUED = "vllm:num_requests_waiting"
IE_RUNNING = "vllm:num_requests_running"
IE_KV_CACHE = "vllm:kv_cache_usage_perc"
# The pre-rename name of the same gauge, still the default of older endpoint pickers.
IE_KV_CACHE_LEGACY = "vllm:gpu_cache_usage_perc"
IE_LORA_INFO = "vllm:lora_requests_info"
IE_LORA_LABELS = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")


def ie_max_lora(engine: AnyEngine) -> int:
    """``max_lora``: the adapter budget (``--max-loaded-adapters``). With no budget (0) every
    adapter the replica has stays loaded and no request ever waits for an adapter slot, so the
    number reported is the adapters it holds (loaded, loading or unloading)."""
    budget = engine.registry.max_loaded
    return budget if budget > 0 else engine.registry.occupying()


class _InferenceExtensionCollector(Collector):
    """Scrape-time gauges under the protocol's names (absent while the model loads)."""

    def __init__(self, engine: Callable[[], AnyEngine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self._engine()
        if engine is None:
            return
        stats = engine.stats()
        model = engine.info.model_id
        gauges = (
            (IE_QUEUED, "Requests waiting in the queue (TotalQueuedRequests)", stats.queued),
            (
                IE_RUNNING,
                "Requests in the running batch (TotalRunningRequests)",
                stats.running,
            ),
            (
                IE_KV_CACHE,
                "KV-cache tokens in use as a fraction of the engine's budget, 0 to 1 "
                "(KVCacheUtilization)",
                stats.kv_cache_utilization,
            ),
            (IE_KV_CACHE_LEGACY, f"Deprecated alias of {IE_KV_CACHE}", stats.kv_cache_utilization),
        )
        for name, documentation, number in gauges:
            gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
            gauge.add_metric([model], float(number))
            yield gauge
        # One sample whose labels carry the state and whose value is when it was taken: the
        # protocol's readers keep the sample with the largest value.
        lora = GaugeMetricFamily(
            IE_LORA_INFO,
            "Adapters of running and of waiting requests (comma-separated) and the adapter "
            "budget; the value is the Unix time of this reading",
            labels=list(IE_LORA_LABELS),
        )
        lora.add_metric(
            [
                ",".join(stats.running_adapters),
                ",".join(stats.waiting_adapters),
                str(ie_max_lora(engine)),
            ],
            time.time(),
        )
        yield lora
