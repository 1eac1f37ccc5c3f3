"""Streams nobody reads: recorded as CANCELLED when abandoned, bounded, and cut off when stalled."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from .. import rawwire
from ..conftest import ServerThread

LONG = pb.GenerateRequest(
    text="the quick brown fox",
    parameters=pb.GenerationParameters(max_new_tokens=200, min_new_tokens=200),
    options=pb.ResponseOptions(return_logprobs=True, top_logprobs=10, return_token_ids=True),
)


class Records(logging.Handler):
    """Collects log records of the server running in this process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def requests(self, rpc: str) -> list[logging.LogRecord]:
        return [
            r
            for r in self.records
            if r.name == "peftserve.requests" and getattr(r, "rpc", None) == rpc
        ]

    def wait_request(self, rpc: str, timeout_s: float = 60.0) -> logging.LogRecord:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            found = self.requests(rpc)
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no request line for {rpc} within {timeout_s}s")


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    requests_logger = logging.getLogger("peftserve.requests")
    previous = requests_logger.level
    requests_logger.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        requests_logger.setLevel(previous)


def _server(**overrides: Any) -> ServerThread:
    server = ServerThread(**overrides)
    server.wait_ready()
    return server


def _idle(server: ServerThread) -> bool:
    engine = server.server.engine()
    end = time.monotonic() + 30
    while time.monotonic() < end:
        stats = server.run_in_loop(engine.stats)
        if stats.queued == 0 and stats.running == 0:
            return True
        time.sleep(0.05)
    return False


def test_abandoned_stream_is_recorded_cancelled(records: Records) -> None:
    server = _server(stream_stall_timeout_s=0.0, max_stream_buffered_tokens=0)
    try:
        stream = rawwire.StalledStream(
            server.port, "StreamGenerate", rawwire.frame(LONG.SerializeToString())
        )
        stream.pump(1.0)  # the first message fills the window; the next write stays pending
        stream.abandon()
        line = records.wait_request("StreamGenerate")
        assert line.status == "CANCELLED", line.__dict__  # type: ignore[attr-defined]
        assert _idle(server)
        errors = [r for r in records.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]
    finally:
        server.stop()


def test_unread_stream_output_is_bounded(records: Records) -> None:
    server = _server(stream_stall_timeout_s=0.0, max_stream_buffered_tokens=32)
    try:
        stream = rawwire.StalledStream(
            server.port, "StreamGenerate", rawwire.frame(LONG.SerializeToString())
        )
        stream.pump(0.5)
        assert _idle(server), "the engine still runs a request whose output nobody reads"
        result = stream.open()
        assert result.status == 8, result  # RESOURCE_EXHAUSTED
        assert "32" in result.message and "read" in result.message
        line = records.wait_request("StreamGenerate")
        assert line.status == "RESOURCE_EXHAUSTED"  # type: ignore[attr-defined]
    finally:
        server.stop()


def test_stalled_stream_is_cancelled(records: Records) -> None:
    server = _server(stream_stall_timeout_s=1.0, max_stream_buffered_tokens=0)
    try:
        stream = rawwire.StalledStream(
            server.port, "StreamGenerate", rawwire.frame(LONG.SerializeToString())
        )
        end = time.monotonic() + 60
        while not records.requests("StreamGenerate") and time.monotonic() < end:
            stream.pump(0.2)  # alive and answering pings, but never reading
        line = records.wait_request("StreamGenerate", 1)
        assert line.status == "CANCELLED"  # type: ignore[attr-defined]
        assert line.reason == "STREAM_STALLED"  # type: ignore[attr-defined]
        assert _idle(server)
        stream.abandon()
    finally:
        server.stop()


def test_slow_watcher_is_dropped_with_a_clear_status(records: Records) -> None:
    server = _server(stream_stall_timeout_s=0.0, max_watch_buffered_events=4)
    try:
        watcher = rawwire.StalledStream(
            server.port,
            "WatchAdapters",
            rawwire.frame(pb.WatchAdaptersRequest().SerializeToString()),
        )
        watcher.pump(0.5)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for _ in range(3):  # 4 changes each: LOADING, READY, UNLOADING, REMOVED
                stub.LoadAdapter(pb.LoadAdapterRequest(name="copy", path="upper"), timeout=30)
                stub.UnloadAdapter(pb.UnloadAdapterRequest(name="copy"), timeout=30)
        result = watcher.open(timeout_s=20)
        assert result.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], result
        assert "watch again" in result.message
        line = records.wait_request("WatchAdapters")
        assert line.reason == "SLOW_CONSUMER"  # type: ignore[attr-defined]
    finally:
        server.stop()
