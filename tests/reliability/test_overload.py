"""A burst far beyond the queue's capacity: fast rejections, and every admitted request OK."""

from __future__ import annotations

import statistics
import time
from typing import Any

import grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from ..server.status_details import details_of

BURST = 200


def test_burst_beyond_queue_capacity() -> None:
    server = ServerThread(max_queue_size=8, max_batch_size=4)
    server.wait_ready()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=10)
            request = pb.GenerateRequest(
                text="the quick brown fox",
                parameters=pb.GenerationParameters(max_new_tokens=40, min_new_tokens=40),
            )
            started: list[float] = []
            finished: dict[int, float] = {}
            futures: list[Any] = []
            for i in range(BURST):
                started.append(time.perf_counter())
                future = stub.Generate.future(request, timeout=120)
                future.add_done_callback(
                    lambda _f, i=i: finished.setdefault(i, time.perf_counter())
                )
                futures.append(future)
            ok = 0
            rejection_ms: list[float] = []
            for i, (start, future) in enumerate(zip(started, futures, strict=True)):
                try:
                    response = future.result()
                except grpc.RpcError as error:
                    details = details_of(error)
                    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                    assert details.reason == "QUEUE_FULL"
                    assert details.retry_delay_s is not None
                    rejection_ms.append((finished[i] - start) * 1000)
                    continue
                assert response.usage.completion_tokens == 40
                ok += 1
        assert ok >= 8, "at least a queue's worth of requests is admitted"
        assert len(rejection_ms) >= BURST // 2, "most of the burst is rejected"
        cuts = statistics.quantiles(rejection_ms, n=100, method="inclusive")
        p50, p99 = cuts[49], cuts[98]
        print(
            f"\nburst {BURST}: {ok} admitted, {len(rejection_ms)} rejected; "
            f"rejection latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
        # A rejection happens at admission, never after waiting for a slot: even the slowest
        # come well before the first admitted batch of 40 forced tokens could free one.
        assert p50 < 2000 and p99 < 5000
    finally:
        server.stop()
