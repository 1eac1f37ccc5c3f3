"""A 1000-call flood far beyond the queue: every call ends (none hangs), rejections are
RESOURCE_EXHAUSTED QUEUE_FULL with a retry hint, and every admitted request completes.

Two floods against one server (in its own process, so its event loop shares no GIL with
this client), with the engine in-process and with ``--engine-process``: a burst (all 1000
calls at once: how long the server takes to say no to all of them) and a sustained overload
(1000 calls at 400/s: how long one refusal waits while the model runs). Time to first
rejection and rejection p50/p99 are printed for the report (SECURITY.md, "Overload"); they
are not asserted, timings on shared cores being noise. ``bench/overload.py`` measures the
same with the model idle, and the server's CPU per refusal.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_status import rpc_status
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..server.test_lifecycle import start_subprocess

FLOOD = 1000
QUEUE = 16
SUSTAINED_RATE = 400.0  # calls/s, far beyond what a 4-row batch of 40 tokens serves


@dataclass
class Flood:
    ok: int = 0
    rejection_ms: list[float] = field(default_factory=list)
    first_ms: float | None = None

    def report(self, name: str) -> str:
        cuts = statistics.quantiles(self.rejection_ms, n=100, method="inclusive")
        return (
            f"{name}: {self.ok} admitted, {len(self.rejection_ms)} rejected; first rejection "
            f"after {self.first_ms:.0f} ms; rejection p50 {cuts[49]:.0f} ms, "
            f"p99 {cuts[98]:.0f} ms"
        )


async def _flood(stub: pb_grpc.GenerationServiceStub, rate: float = 0.0) -> Flood:
    """FLOOD calls, all at once (``rate`` 0) or open-loop at ``rate`` calls/s."""
    request = pb.GenerateRequest(
        text="the quick brown fox",
        parameters=pb.GenerationParameters(max_new_tokens=40, min_new_tokens=40),
    )
    result = Flood()
    flood_started = time.perf_counter()

    async def one(index: int) -> None:
        if rate:
            await asyncio.sleep(flood_started + index / rate - time.perf_counter())
        started = time.perf_counter()
        try:
            response = await stub.Generate(request, timeout=120)
        except grpc.aio.AioRpcError as error:
            now = time.perf_counter()
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            metadata = dict(error.trailing_metadata() or ())
            assert "grpc-retry-pushback-ms" in metadata, metadata
            kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
            assert {"ErrorInfo", "RetryInfo"} <= kinds, kinds
            result.rejection_ms.append((now - started) * 1000)
            if result.first_ms is None:
                result.first_ms = (now - flood_started) * 1000
            return
        assert response.usage.completion_tokens == 40
        result.ok += 1

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(FLOOD))), 300)
    return result


async def _floods(address: str) -> tuple[Flood, Flood]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await stub.Tokenize(pb.TokenizeRequest(text="warm up"), timeout=30)
        burst = await _flood(stub)
        sustained = await _flood(stub, SUSTAINED_RATE)
    return burst, sustained


@pytest.mark.parametrize("engine_process", ["false", "true"])
def test_flood_beyond_queue_capacity(engine_process: str) -> None:
    process, address = start_subprocess(
        "--max-queue-size",
        str(QUEUE),
        "--max-batch-size",
        "4",
        "--log-level",
        "WARNING",
        "--engine-process",
        engine_process,
    )
    try:
        burst, sustained = asyncio.run(_floods(address))
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    for flood in (burst, sustained):
        assert flood.ok + len(flood.rejection_ms) == FLOOD, "every call ended"
        assert flood.ok >= QUEUE, "at least a queue's worth of requests is admitted"
        assert len(flood.rejection_ms) >= FLOOD // 2, "most of the flood is rejected"
    mode = "engine process" if engine_process == "true" else "in-process"
    print(
        f"\n{mode}: {burst.report(f'burst of {FLOOD} (queue {QUEUE})')}"
        f"\n{mode}: {sustained.report(f'{FLOOD} at {SUSTAINED_RATE:.0f}/s')}"
    )
