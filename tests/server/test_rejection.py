"""The cheap refusal of a full queue: what the caller sees is exactly the full status.

Under a flood most calls end in QUEUE_FULL, so that path is built for cost (server/errors.py
splices the status from parts made once; the servicer checks the queue before reading the
request; the request line is rate-limited). These tests pin that nothing a caller or an
operator relies on changed: code, message, ErrorInfo with the request id, RetryInfo, the
``grpc-retry-pushback-ms`` trailer, a log line (within its rate) and a metric for every call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from peftserve.server import interceptor
from peftserve.server.engine.errors import QueueFullError
from peftserve.server.errors import ERROR_DOMAIN, clip, to_grpc_status
from peftserve.server.logs import RateLimit
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from .test_errors import blocking_request, long_request, rpc_error, wait_for_stats
from .test_metrics import scrape, scrape_until
from .test_stream_bounds import Records


def _plain_status(error: QueueFullError, request_id: str) -> bytes:
    """The status as protobuf builds it field by field: what the splice must equal."""
    info = error_details_pb2.ErrorInfo(
        reason="QUEUE_FULL",
        domain=ERROR_DOMAIN,
        metadata={"request_id": clip(request_id, 128)} if request_id else {},
    )
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, int(error.retry_after_s * 1000)))
    details = []
    for message in (info, error_details_pb2.RetryInfo(retry_delay=delay)):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message=clip(error.message, 400), details=details
    )
    return status.SerializeToString()


@pytest.mark.parametrize("request_id", ["", "abc", "é" * 200, "x" * 1000, "a\nb\x00"])
@pytest.mark.parametrize(("waiting", "retry_s"), [(1, 0.1), (16, 0.4), (4096, 123.456)])
def test_queue_full_status_is_byte_for_byte_the_plain_one(
    request_id: str, waiting: int, retry_s: float
) -> None:
    error = QueueFullError(waiting, retry_s)
    status = to_grpc_status(error, request_id)
    trailers = dict(status.trailing_metadata)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.details == error.message
    assert trailers[rpc_status.GRPC_DETAILS_METADATA_KEY] == _plain_status(error, request_id)
    assert trailers["grpc-retry-pushback-ms"] == str(max(1, int(retry_s * 1000)))
    assert list(trailers) == [rpc_status.GRPC_DETAILS_METADATA_KEY, "grpc-retry-pushback-ms"]


@pytest.fixture(scope="module")
def tight_server() -> Iterator[ServerThread]:
    server = ServerThread(
        max_batch_size=1, max_queue_size=1, max_wait_ms=0.0, metrics_address="127.0.0.1:0"
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def full_server(tight_server: ServerThread) -> Iterator[ServerThread]:
    """One running and one queued request: every further Generate finds the queue full."""
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        running = stub.Generate.future(blocking_request(), timeout=300)
        wait_for_stats(tight_server, queued=0, running=1)
        queued = stub.Generate.future(long_request(), timeout=300)
        wait_for_stats(tight_server, queued=1, running=1)
        yield tight_server
        running.cancel()
        queued.cancel()
        wait_for_stats(tight_server, queued=0, running=0)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    requests_logger = logging.getLogger("peftserve.requests")
    previous = requests_logger.level
    requests_logger.setLevel(logging.INFO)
    requests_logger.addHandler(handler)
    try:
        yield handler
    finally:
        requests_logger.removeHandler(handler)
        requests_logger.setLevel(previous)


def _status(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, int, dict[str, Any]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    kinds = []
    for detail in status.details:
        kinds.append(detail.type_url)
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
    assert kinds == [
        "type.googleapis.com/google.rpc.ErrorInfo",
        "type.googleapis.com/google.rpc.RetryInfo",
    ]
    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    return info, retry.retry_delay.ToMilliseconds(), trailers


@pytest.mark.parametrize("streaming", [False, True])
def test_full_queue_answers_with_the_callers_request_id(
    full_server: ServerThread, streaming: bool
) -> None:
    with grpc.insecure_channel(full_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.StreamGenerate if streaming else stub.Generate
        request = pb.GenerateRequest(text="hi", request_id="caller-7")
        error = rpc_error(call, request, timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert error.details().startswith("the request queue is full (1 waiting)")  # type: ignore[attr-defined]
    info, retry_ms, trailers = _status(error)
    assert (info.reason, info.domain) == ("QUEUE_FULL", ERROR_DOMAIN)
    assert dict(info.metadata) == {"request_id": "caller-7"}
    assert retry_ms > 0 and trailers["grpc-retry-pushback-ms"] == str(retry_ms)


def test_full_queue_refuses_before_reading_the_request(full_server: ServerThread) -> None:
    """An invalid request finds the queue full first (it is not converted or validated), and
    still gets a request id of the server's making, as any call without one does."""
    with grpc.insecure_channel(full_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        error = rpc_error(stub.Generate, pb.GenerateRequest(), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    info, _, _ = _status(error)
    assert info.reason == "QUEUE_FULL"
    assert len(info.metadata["request_id"]) == 32


def test_queue_full_lines_are_rate_limited_and_every_call_is_counted(
    full_server: ServerThread, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh limiter whose window outlasts the test: exactly its burst gets a line.
    monkeypatch.setattr(interceptor, "OVERLOAD_LINES", RateLimit(burst=5, interval_s=600.0))
    port = full_server.server.metrics_port
    assert port
    key = (
        "peftserve_requests_total",
        frozenset({"rpc": "Generate", "status": "RESOURCE_EXHAUSTED", "adapter": ""}.items()),
    )
    before = scrape(port).get(key, 0.0)
    with grpc.insecure_channel(full_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for index in range(30):
            request = pb.GenerateRequest(text="hi", request_id=f"flood-{index}")
            error = rpc_error(stub.Generate, request, timeout=30)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    lines = [r for r in records.requests("Generate") if getattr(r, "reason", "") == "QUEUE_FULL"]
    assert [r.request_id for r in lines] == [f"flood-{i}" for i in range(5)]  # type: ignore[attr-defined]
    assert all(r.status == "RESOURCE_EXHAUSTED" for r in lines)  # type: ignore[attr-defined]
    # A call is counted just after its status is sent: the scrape may need a moment.
    samples = scrape_until(port, lambda s: s.get(key, 0.0) - before >= 30)
    assert samples.get(key, 0.0) - before == 30
