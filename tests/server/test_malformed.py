"""Bytes no gRPC library would send: malformed protobuf is INVALID_ARGUMENT, logged and counted;
a malformed ``grpc-timeout`` is refused by grpc core as INTERNAL (known, see SECURITY.md)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest
from peftserve.v1 import generation_pb2 as pb

from .. import rawwire
from ..conftest import ServerThread
from .test_metrics import scrape_when, value
from .test_stream_bounds import Records

pytest.importorskip("prometheus_client")

OK_BODY = pb.GenerateRequest(
    text="hi", parameters=pb.GenerationParameters(max_new_tokens=1)
).SerializeToString()
MALFORMED = {
    # field 1 (request_id) holding the bytes FF FE: not UTF-8
    "bad-utf8-string": b"\x0a\x02\xff\xfe",
    "corrupt-wire": b"\xff\xff\xff",
    "truncated-length": b"\x12\x10ab",
    "bad-wire-type": b"\x0f",
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    server = ServerThread(metrics_address="127.0.0.1:0")
    server.wait_ready()
    yield server
    server.stop()


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


@pytest.mark.parametrize("method", ["Generate", "StreamGenerate", "Tokenize", "LoadAdapter"])
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_protobuf_is_invalid_argument(
    server: ServerThread, records: Records, method: str, name: str
) -> None:
    result = rawwire.call(server.port, method, rawwire.frame(MALFORMED[name]))
    assert result.status == grpc.StatusCode.INVALID_ARGUMENT.value[0], result
    assert "not valid" in result.message and "Error" not in result.message.split(":")[0]
    assert "<class" not in result.message
    line = records.wait_request(method, 10)
    assert line.status == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    assert line.reason == "MALFORMED_MESSAGE"  # type: ignore[attr-defined]
    assert not [r for r in records.records if r.levelno >= logging.ERROR]


def test_malformed_protobuf_is_counted(server: ServerThread) -> None:
    result = rawwire.call(server.port, "GetModelInfo", rawwire.frame(b"\xff\xff"))
    assert result.status == grpc.StatusCode.INVALID_ARGUMENT.value[0], result
    key = (
        "peftserve_requests_total",
        frozenset({("rpc", "GetModelInfo"), ("status", "INVALID_ARGUMENT"), ("adapter", "")}),
    )
    port = server.server.metrics_port
    assert port
    samples = scrape_when(port, key)
    assert (
        value(
            samples,
            "peftserve_requests_total",
            rpc="GetModelInfo",
            status="INVALID_ARGUMENT",
            adapter="",
        )
        >= 1
    )


@pytest.mark.parametrize("timeout", [b"abc", b"-1m", b"5", b"1x", b"", b"1.5S"])
def test_malformed_grpc_timeout_is_refused_by_grpc_core(
    server: ServerThread, timeout: bytes
) -> None:
    """Known limitation: grpc core (1.85) answers INTERNAL before any interceptor runs.

    If this starts failing, grpc changed its mapping: update SECURITY.md ("Known limits").
    """
    result = rawwire.call(
        server.port, "Generate", rawwire.frame(OK_BODY), metadata=[(b"grpc-timeout", timeout)]
    )
    assert result.status == grpc.StatusCode.INTERNAL.value[0], result
    assert "grpc-timeout" in result.message
    # The server keeps serving.
    ok = rawwire.call(server.port, "Generate", rawwire.frame(OK_BODY))
    assert ok.status == 0, ok
