"""A 1000-call flood far beyond the queue: every call ends (none hangs), rejections are
RESOURCE_EXHAUSTED QUEUE_FULL with a retry hint, and every admitted request completes.

The server runs in its own process (its event loop must not share a GIL with this client).
Time to first rejection and rejection p50/p99 are printed for the report (SECURITY.md,
"Overload"); they are not asserted, timings on shared cores being noise.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time

import grpc
from grpc_status import rpc_status
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..server.test_lifecycle import start_subprocess

FLOOD = 1000
QUEUE = 16


async def _flood(address: str) -> tuple[int, list[float], float | None, dict[str, int]]:
    request = pb.GenerateRequest(
        text="the quick brown fox",
        parameters=pb.GenerationParameters(max_new_tokens=40, min_new_tokens=40),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await stub.Tokenize(pb.TokenizeRequest(text="warm up"), timeout=30)
        ok = 0
        rejection_ms: list[float] = []
        first: float | None = None
        reasons: dict[str, int] = {}
        flood_started = time.perf_counter()

        async def one() -> None:
            nonlocal ok, first
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
                reasons[error.code().name] = reasons.get(error.code().name, 0) + 1
                rejection_ms.append((now - started) * 1000)
                if first is None:
                    first = (now - flood_started) * 1000
                return
            assert response.usage.completion_tokens == 40
            ok += 1

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(FLOOD))), 300)
    return ok, rejection_ms, first, reasons


def test_flood_beyond_queue_capacity() -> None:
    process, address = start_subprocess(
        "--max-queue-size", str(QUEUE), "--max-batch-size", "4", "--log-level", "WARNING"
    )
    try:
        ok, rejection_ms, first, reasons = asyncio.run(_flood(address))
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert ok + len(rejection_ms) == FLOOD, "every call ended"
    assert ok >= QUEUE, "at least a queue's worth of requests is admitted"
    assert len(rejection_ms) >= FLOOD // 2, "most of the flood is rejected"
    cuts = statistics.quantiles(rejection_ms, n=100, method="inclusive")
    print(
        f"\nflood {FLOOD} (queue {QUEUE}): {ok} admitted, {len(rejection_ms)} rejected {reasons}; "
        f"first rejection after {first:.0f} ms; rejection p50 {cuts[49]:.0f} ms, "
        f"p99 {cuts[98]:.0f} ms"
    )
