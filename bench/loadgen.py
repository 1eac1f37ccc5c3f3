"""Load generation: closed-loop, open-loop (Poisson) and burst arrivals, unary or streaming.

A ``Target`` runs one request and times it; the drivers here decide *when* requests start.
Targets: peftserve through the shipped ``AsyncPeftServeClient``, and ``transformers serve``
through its OpenAI-style ``/v1/completions`` HTTP endpoint. Every target only ever talks to
127.0.0.1 (checked), and every run is bounded by a request count and a duration.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .workload import RequestSpec

__all__ = [
    "LOAD_MODES",
    "LoadConfig",
    "LoadResult",
    "PeftServeTarget",
    "RequestSample",
    "Target",
    "TransformersServeTarget",
    "check_loopback",
    "run_load",
]

LOAD_MODES: tuple[str, ...] = ("closed", "open", "burst")
# A request that takes longer than this is recorded as failed rather than stalling the run.
REQUEST_TIMEOUT_S = 300.0


@dataclass
class RequestSample:
    """What the client observed about one request; times are ``time.perf_counter()`` seconds."""

    request_id: str
    adapter: str
    stream: bool
    start_s: float
    end_s: float = 0.0
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    # Arrival time of every stream message that carried tokens (the final summary excluded).
    message_times_s: list[float] = field(default_factory=list)
    # Server-reported queue wait (from the response's timing), when the target reports one.
    queue_wait_ms: float | None = None
    # Size of the batch the request ran in, joined in afterwards from the server's request log.
    batch_size: int | None = None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float | None:
        """Time to the first streamed message; None for unary requests."""
        if not self.stream or not self.message_times_s:
            return None
        return self.message_times_s[0] - self.start_s


class Target(Protocol):
    """Something that can run one request and report what it saw."""

    name: str

    async def run(self, spec: RequestSpec, stream: bool) -> RequestSample: ...

    async def close(self) -> None: ...


def check_loopback(address: str) -> None:
    """Refuse any target but 127.0.0.1: the harness must never load someone else's server."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"benchmarks only target 127.0.0.1, not {address!r}")


class PeftServeTarget:
    """peftserve over gRPC via ``peftserve.client.AsyncPeftServeClient`` (one shared channel)."""

    def __init__(self, address: str, name: str = "peftserve") -> None:
        from peftserve.client import AsyncPeftServeClient

        check_loopback(address)
        self.name = name
        # Created inside the running loop: grpc.aio binds a channel to the loop that made it.
        self._client = AsyncPeftServeClient(address, timeout_s=REQUEST_TIMEOUT_S)

    async def run(self, spec: RequestSpec, stream: bool) -> RequestSample:
        from peftserve.client import PeftServeClientError, SequenceDelta, StreamSummary

        options: dict[str, Any] = {
            "adapter": spec.adapter,
            "max_new_tokens": spec.output_tokens,
            "do_sample": False,
            "request_id": spec.request_id,
        }
        if spec.exact_length:
            options["min_new_tokens"] = spec.output_tokens
        if spec.num_beams > 1:
            options["num_beams"] = spec.num_beams
        sample = RequestSample(spec.request_id, spec.adapter, stream, time.perf_counter())
        try:
            if stream:
                async for event in self._client.stream_events(spec.prompt, **options):
                    now = time.perf_counter()
                    if isinstance(event, SequenceDelta):
                        sample.message_times_s.append(now)
                    elif isinstance(event, StreamSummary):
                        output = event.output
                        sample.prompt_tokens = output.prompt_tokens
                        sample.output_tokens = output.completion_tokens
                        sample.queue_wait_ms = output.queue_wait_ms
            else:
                output = await self._client.generate(spec.prompt, **options)
                sample.prompt_tokens = output.prompt_tokens
                sample.output_tokens = output.completion_tokens
                sample.queue_wait_ms = output.queue_wait_ms
            sample.ok = True
        except PeftServeClientError as error:
            sample.error = error.code.name
        sample.end_s = time.perf_counter()
        return sample

    async def close(self) -> None:
        await self._client.close()


class TransformersServeTarget:
    """``transformers serve`` via ``POST /v1/completions`` (raw prompt, no chat template).

    The generation config goes in the body's ``generation_config`` JSON, which transformers
    uses *instead of* the model's own, so the special token ids are repeated there.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        special_token_ids: dict[str, int],
        max_connections: int,
        name: str = "transformers-serve",
    ) -> None:
        import httpx2  # transformers' own HTTP client dependency (via huggingface_hub)

        check_loopback(base_url)
        self.name = name
        self._model = model
        self._special = dict(special_token_ids)
        self._http = httpx2.AsyncClient(
            base_url=base_url,
            timeout=httpx2.Timeout(REQUEST_TIMEOUT_S),
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # Never route loopback traffic through a proxy from the environment.
            trust_env=False,
        )

    def _body(self, spec: RequestSpec, stream: bool) -> dict[str, Any]:
        config: dict[str, Any] = {
            **self._special,
            "max_new_tokens": spec.output_tokens,
            "do_sample": False,
        }
        if spec.exact_length:
            # Continuous batching ignores min_new_tokens and stops at EOS; its per-request
            # eos_token_id of -1 means "no EOS", so the request runs to exactly max_new_tokens.
            config.update(min_new_tokens=spec.output_tokens, eos_token_id=-1)
        return {
            "model": self._model,
            "prompt": spec.prompt,
            "max_tokens": spec.output_tokens,
            "stream": stream,
            "generation_config": json.dumps(config),
        }

    async def run(self, spec: RequestSpec, stream: bool) -> RequestSample:
        sample = RequestSample(spec.request_id, spec.adapter, stream, time.perf_counter())
        body = self._body(spec, stream)
        try:
            if stream:
                async with self._http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        sample.error = f"HTTP {response.status_code}"
                    else:
                        await self._read_sse(response, sample)
            else:
                response = await self._http.post("/v1/completions", json=body)
                if response.status_code != 200:
                    sample.error = f"HTTP {response.status_code}"
                else:
                    usage = response.json().get("usage") or {}
                    sample.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    sample.output_tokens = int(usage.get("completion_tokens", 0))
                    sample.ok = True
        except Exception as error:  # any transport failure is a failed sample, not a crash
            sample.error = type(error).__name__
        sample.end_s = time.perf_counter()
        return sample

    @staticmethod
    async def _read_sse(response: Any, sample: RequestSample) -> None:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(payload)
            if "error" in chunk:
                sample.error = str(chunk["error"])[:80]
                return
            usage = chunk.get("usage")
            if usage:
                sample.prompt_tokens = int(usage.get("prompt_tokens", 0))
                sample.output_tokens = int(usage.get("completion_tokens", 0))
            elif any(choice.get("text") for choice in chunk.get("choices", [])):
                sample.message_times_s.append(now)
        sample.ok = sample.output_tokens > 0

    async def close(self) -> None:
        await self._http.aclose()


@dataclass(frozen=True)
class LoadConfig:
    """When requests start: ``mode`` closed (``concurrency`` callers each send the next request
    as soon as their last one ends), open (Poisson arrivals at ``rate_rps``), or burst
    (``concurrency`` requests released at once, the next burst when all have finished)."""

    mode: str = "closed"
    concurrency: int = 1
    rate_rps: float = 10.0
    duration_s: float = 60.0
    stream: bool = False
    seed: int = 0


@dataclass
class LoadResult:
    """The samples of one run and its wall-clock window."""

    samples: list[RequestSample]
    started_s: float
    ended_s: float
    # Requests sent alongside the measured ones (e.g. beam searches next to streams).
    background: list[RequestSample] = field(default_factory=list)
    # The server's step histograms over the run (bench.server_metrics.step_delta), if scraped.
    steps: dict[str, Any] | None = None

    @property
    def wall_s(self) -> float:
        return max(self.ended_s - self.started_s, 1e-9)


async def run_load(
    target: Target,
    specs: Sequence[RequestSpec],
    config: LoadConfig,
    on_done: Callable[[RequestSample], None] | None = None,
) -> LoadResult:
    """Send ``specs`` to ``target`` as ``config`` says; stop starting new ones after
    ``duration_s`` (requests already started run to completion)."""
    if config.mode not in LOAD_MODES:
        raise ValueError(f"mode must be one of {LOAD_MODES}, got {config.mode!r}")
    samples: list[RequestSample] = []
    started = time.perf_counter()
    deadline = started + config.duration_s

    async def one(spec: RequestSpec) -> None:
        sample = await target.run(spec, config.stream)
        samples.append(sample)
        if on_done is not None:
            on_done(sample)

    if config.mode == "closed":
        queue = list(reversed(specs))

        async def caller() -> None:
            while queue and time.perf_counter() < deadline:
                await one(queue.pop())

        await asyncio.gather(*(caller() for _ in range(max(1, config.concurrency))))
    elif config.mode == "open":
        if config.rate_rps <= 0:
            raise ValueError("open-loop mode needs rate_rps > 0")
        rng = random.Random(config.seed)
        tasks: list[asyncio.Task[None]] = []
        arrival = started
        for spec in specs:
            arrival += rng.expovariate(config.rate_rps)
            if arrival >= deadline:
                break
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            # Open loop: a request starts at its arrival time whether or not others finished.
            tasks.append(asyncio.create_task(one(spec)))
        await asyncio.gather(*tasks)
    else:
        size = max(1, config.concurrency)
        for begin in range(0, len(specs), size):
            if time.perf_counter() >= deadline:
                break
            await asyncio.gather(*(one(spec) for spec in specs[begin : begin + size]))
    ended = max((s.end_s for s in samples), default=time.perf_counter())
    return LoadResult(samples=samples, started_s=started, ended_s=ended)
