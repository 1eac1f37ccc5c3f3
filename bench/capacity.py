"""How soon does a cancelled row's place serve a queued request? Counted in decode steps.

One trial, on a server whose running batch holds ``capacity`` rows (``--max-batch-size``):

1. ``capacity`` long streams fill the batch (each generates exactly ``neighbour_tokens``);
2. one more stream is sent and must wait: it has no token while the others advance a few
   steps (a trial where it starts anyway is invalid: the batch was not full);
3. one running stream is cancelled by its caller (the RPC is cancelled, as a client that stops
   listening does), and the clock starts;
4. the count is the tokens a still-running neighbour receives until the queued stream's first
   token arrives: one token per decode step, so it is the steps that passed. The time is
   reported too, with the neighbour's inter-token gap over the same window.

Messages may carry several tokens (stream coalescing), so tokens are counted, not messages.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loadgen import REQUEST_TIMEOUT_S, check_loopback
from .server_metrics import SCRAPE_TIMEOUT_S

__all__ = ["CancelReuseConfig", "run_cancel_reuse"]

PROMPT = "the quick brown fox"
# How many neighbour tokens to wait, after sending the queued request, before cancelling: the
# queued request has had that many step boundaries to be (wrongly) admitted.
SETTLE_TOKENS = 4
STEP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CancelReuseConfig:
    capacity: int = 4
    neighbour_tokens: int = 200
    queued_tokens: int = 8
    trials: int = 5
    warmup: bool = True  # one unrecorded trial first


@dataclass
class _Stream:
    """One stream's token arrivals: (time, tokens in the message)."""

    arrivals: list[tuple[float, int]] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    error: str = ""


async def _consume(client: Any, stream: _Stream, tokens: int, request_id: str) -> None:
    from peftserve.client import PeftServeClientError, SequenceDelta

    try:
        async for event in client.stream_events(
            PROMPT,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            return_token_ids=True,
            request_id=request_id,
        ):
            if isinstance(event, SequenceDelta) and event.token_ids:
                stream.arrivals.append((time.perf_counter(), len(event.token_ids)))
                stream.tokens += len(event.token_ids)
                stream.first.set()
                stream.changed.set()
    except PeftServeClientError as error:
        stream.error = error.code.name
    finally:
        stream.done = True
        stream.changed.set()
        stream.first.set()  # a stream that failed before its first token must not hang a trial


async def _wait_tokens(stream: _Stream, at_least: int) -> None:
    """Until the stream has ``at_least`` tokens or has ended."""
    while stream.tokens < at_least and not stream.done:
        stream.changed.clear()
        await stream.changed.wait()


async def _trial(client: Any, config: CancelReuseConfig, index: int) -> dict[str, Any]:
    streams = [_Stream() for _ in range(config.capacity)]
    tasks = [
        asyncio.create_task(
            _consume(client, s, config.neighbour_tokens, f"cancel-reuse-{index}-row{i}")
        )
        for i, s in enumerate(streams)
    ]
    queued = _Stream()
    queued_task: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams)), STEP_TIMEOUT_S)
        if any(s.done for s in streams):
            # The rows did not all run at once (e.g. a static batcher split them in two).
            return {"trial": index, "valid": False, "reason": "the rows did not run together"}
        victim, neighbour = streams[0], streams[1]
        queued_task = asyncio.create_task(
            _consume(client, queued, config.queued_tokens, f"cancel-reuse-{index}-queued")
        )
        await asyncio.wait_for(
            _wait_tokens(neighbour, neighbour.tokens + SETTLE_TOKENS), STEP_TIMEOUT_S
        )
        if queued.first.is_set() or any(s.done for s in streams):
            return {"trial": index, "valid": False, "reason": "the batch was not full"}
        cancelled_at = time.perf_counter()
        tasks[0].cancel()  # leaving the stream cancels the RPC
        await asyncio.wait_for(queued.first.wait(), STEP_TIMEOUT_S)
        if not queued.arrivals:
            return {"trial": index, "valid": False, "reason": f"queued: {queued.error}"}
        started_at = queued.arrivals[0][0]
        window = [n for t, n in neighbour.arrivals if cancelled_at < t <= started_at]
        before = [t for t, _ in neighbour.arrivals if t <= cancelled_at]
        gaps = [b - a for a, b in itertools.pairwise(before)][-20:]
        return {
            "trial": index,
            "valid": True,
            "steps": sum(window),
            "ms": round((started_at - cancelled_at) * 1000.0, 3),
            "neighbour_itl_ms": round(statistics.median(gaps) * 1000.0, 3) if gaps else None,
            "victim_tokens": victim.tokens,
        }
    finally:
        for task in [*tasks, *([queued_task] if queued_task else [])]:
            task.cancel()
        await asyncio.gather(
            *tasks, *([queued_task] if queued_task else []), return_exceptions=True
        )


async def _wait_idle(metrics_port: int | None) -> None:
    """Until the server reports no running rows (cancels take effect at a step boundary)."""
    if not metrics_port:
        await asyncio.sleep(1.0)
        return
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def running_rows() -> float:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            for family in text_string_to_metric_families(response.read().decode()):
                if family.name == "peftserve_engine_running_rows":
                    return float(family.samples[0].value)
        return 0.0

    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline and await asyncio.to_thread(running_rows) > 0:
        await asyncio.sleep(0.05)


def run_cancel_reuse(
    address: str, config: CancelReuseConfig, metrics_port: int | None = None
) -> dict[str, Any]:
    """Run ``config.trials`` trials against ``address``; the scenario's JSON record."""
    from peftserve.client import AsyncPeftServeClient

    check_loopback(address)

    async def go() -> list[dict[str, Any]]:
        async with AsyncPeftServeClient(address, timeout_s=REQUEST_TIMEOUT_S) as client:
            trials = []
            first = 0 if config.warmup else 1  # trial 0 warms up, unrecorded
            for index in range(first, config.trials + 1):
                trial = await _trial(client, config, index)
                await _wait_idle(metrics_port)
                if index > 0:
                    trials.append(trial)
            return trials

    trials = asyncio.run(go())
    valid = [t for t in trials if t["valid"]]
    steps = [t["steps"] for t in valid]
    return {
        "config": {
            "capacity": config.capacity,
            "neighbour_tokens": config.neighbour_tokens,
            "queued_tokens": config.queued_tokens,
            "trials": config.trials,
        },
        "trials": trials,
        "valid_trials": len(valid),
        "steps_max": max(steps) if steps else None,
        "steps_median": statistics.median(steps) if steps else None,
        "ms_median": statistics.median(t["ms"] for t in valid) if valid else None,
    }


def run_cancel_reuse_engine(
    model_path: Path, adapters_dir: Path | None, config: CancelReuseConfig, torch_threads: int
) -> dict[str, Any]:
    """The same trial on the engine in this process, counted by the engine's own steps.

    Over gRPC, the count above also holds the cancel's trip to the server and the event loop's
    delay in sending tokens, both noisy on a loaded machine. Here a step listener numbers the
    engine's steps; the count is the steps from the one running when ``cancel()`` is called to
    the first whose end finds the queued request admitted (none left waiting). 1 means the
    next step already serves it.
    """
    import threading

    import torch
    from peftserve.server.engine import Engine, StepStats
    from peftserve.server.engine.config import EngineConfig
    from peftserve.server.engine.types import GenerationParams, GenerationRequest

    torch.set_num_threads(torch_threads)

    def request(request_id: str, tokens: int) -> GenerationRequest:
        params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return GenerationRequest(request_id, text=PROMPT, parameters=params)

    async def go() -> list[dict[str, Any]]:
        engine_config = EngineConfig(
            model_path=model_path, adapters_dir=adapters_dir, max_batch_size=config.capacity
        )
        engine = await asyncio.to_thread(Engine, engine_config)
        await engine.start()
        lock = threading.Lock()
        steps: list[int] = [0]
        waiting_after: dict[int, int] = {}  # step number -> requests still queued after it

        def on_step(_: StepStats) -> None:
            queued = engine.stats().queued
            with lock:
                steps[0] += 1
                waiting_after[steps[0]] = queued

        unsubscribe = engine.add_step_listener(on_step)
        trials = []
        try:
            first = 0 if config.warmup else 1
            for index in range(first, config.trials + 1):
                rows = [
                    engine.submit(request(f"row{index}-{i}", config.neighbour_tokens), stream=True)
                    for i in range(config.capacity)
                ]
                iterators = [row.__aiter__() for row in rows]
                for iterator in iterators:
                    await asyncio.wait_for(iterator.__anext__(), STEP_TIMEOUT_S)
                queued = engine.submit(request(f"queued{index}", config.queued_tokens), stream=True)
                # A few steps for the queued request to be (wrongly) admitted.
                with lock:
                    settle = steps[0] + SETTLE_TOKENS
                while True:
                    with lock:
                        if steps[0] >= settle:
                            break
                    await asyncio.sleep(0.001)
                valid = engine.stats().queued == 1 and all(not r.done for r in rows)
                with lock:
                    cancelled_at = steps[0]
                rows[0].cancel()
                await asyncio.wait_for(queued.__aiter__().__anext__(), STEP_TIMEOUT_S)
                # Its first token can reach this loop before the listener of the step that made
                # it has run: wait for that record (a few steps at most).
                admitted = None
                deadline = time.monotonic() + STEP_TIMEOUT_S
                while admitted is None and time.monotonic() < deadline:
                    with lock:
                        admitted = next(
                            (
                                n
                                for n in sorted(waiting_after)
                                if n > cancelled_at and not waiting_after[n]
                            ),
                            None,
                        )
                    await asyncio.sleep(0.001)
                for row in rows[1:]:
                    row.cancel()
                await asyncio.gather(*(r.result() for r in [*rows, queued]), return_exceptions=True)
                if index == 0:
                    continue
                if not valid or admitted is None:
                    trials.append(
                        {"trial": index, "valid": False, "reason": "the batch was not full"}
                    )
                else:
                    trials.append({"trial": index, "valid": True, "steps": admitted - cancelled_at})
        finally:
            unsubscribe()
            await engine.stop()
        return trials

    trials = asyncio.run(go())
    steps = [t["steps"] for t in trials if t["valid"]]
    return {
        "trials": trials,
        "valid_trials": len(steps),
        "steps_max": max(steps) if steps else None,
        "steps_median": statistics.median(steps) if steps else None,
    }
