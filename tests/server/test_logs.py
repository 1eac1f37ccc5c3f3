"""Logs a pipeline can trust: caller values cannot forge lines, tokens never reach the log, and
``--log-format json`` makes every line on stdout and stderr one JSON object."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from peftserve.server import auth
from peftserve.server.logs import RateLimit, TextFormatter
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from .. import rawwire
from ..conftest import ServerThread
from .status_details import details_of
from .test_lifecycle import start_subprocess

TOKEN = "t" * 40
# Every way a value could start, end or hide a line, or spoof a field.
HOSTILE = [
    "abc\nFORGED 2026-01-01 00:00:00,000 INFO peftserve.requests: request status=OK",
    "abc\rFORGED",
    "abc\x1b[2K\x1b[1Aansi",
    "abc\x00nul",
    "abc\u2028FORGED",
    "abc\u202eevil",
    "abc status=INTERNAL",
    'abc" status="INTERNAL',
]
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    requests_logger = logging.getLogger("peftserve.requests")
    previous = requests_logger.level
    requests_logger.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        requests_logger.setLevel(previous)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    server = ServerThread()
    server.wait_ready()
    yield server
    server.stop()


def _request_lines(log: io.StringIO) -> list[str]:
    return [
        line
        for line in log.getvalue().splitlines()
        if LINE_START.match(line) and " peftserve.requests: request rpc=" in line
    ]


def _request_fields(line: str) -> list[tuple[str, str]]:
    return LOGFMT_FIELD.findall(line.split(": request ", 1)[1])


@pytest.mark.parametrize("value", HOSTILE)
def test_caller_values_cannot_forge_or_spoof_log_lines(
    server: ServerThread, text_log: io.StringIO, value: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        codes = []
        for call in (
            # An invalid top_p makes the call fail whether or not the id is accepted.
            lambda: stub.Generate(
                pb.GenerateRequest(
                    text="hi", request_id=value, parameters=pb.GenerationParameters(top_p=5)
                ),
                timeout=30,
            ),
            lambda: stub.Generate(pb.GenerateRequest(text="hi", adapter=value), timeout=30),
            lambda: stub.LoadAdapter(pb.LoadAdapterRequest(name=value), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            codes.append(details_of(caught.value))
    request_id, adapter, load = codes
    assert request_id.code == grpc.StatusCode.INVALID_ARGUMENT
    if not value.isprintable():
        # Control, format and separator characters in a request id are refused outright.
        assert request_id.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in request_id.field_violations
    assert adapter.code == grpc.StatusCode.NOT_FOUND
    assert load.code == grpc.StatusCode.INVALID_ARGUMENT
    # The line is written once the status is sent: give the server a moment to write it.
    deadline = time.monotonic() + 10
    while len(_request_lines(text_log)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = text_log.getvalue().splitlines()
    request_lines = _request_lines(text_log)
    assert len(request_lines) == 3, "\n".join(lines)
    for line in lines:
        assert LINE_START.match(line) or line.startswith("  | "), line
        assert line.isprintable(), line
    for line in request_lines:
        fields = _request_fields(line)
        assert [k for k, _ in fields].count("status") == 1, line
        status = dict(fields)["status"]
        assert status in {"INVALID_ARGUMENT", "NOT_FOUND"}, line


def test_request_id_with_spaces_stays_one_value(
    server: ServerThread, text_log: io.StringIO
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stub.Generate(
            pb.GenerateRequest(
                text="hi",
                request_id="abc status=INTERNAL",
                parameters=pb.GenerationParameters(max_new_tokens=1),
            ),
            timeout=30,
        )
    deadline = time.monotonic() + 10
    while not _request_lines(text_log) and time.monotonic() < deadline:
        time.sleep(0.02)
    (line,) = _request_lines(text_log)
    fields = dict(_request_fields(line))
    assert fields["request_id"] == '"abc status=INTERNAL"'
    assert fields["status"] == "OK"


def test_non_utf8_metadata_never_puts_the_token_in_the_log() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    server = ServerThread(auth_tokens=(TOKEN,))
    try:
        server.wait_ready()
        body = rawwire.frame(pb.GenerateRequest(text="hi").SerializeToString())
        secret = b"Bearer " + TOKEN.encode() + b"\xff" + b"SECRETSUFFIX"
        for _ in range(30):
            result = rawwire.call(
                server.port, "Generate", body, metadata=[(b"authorization", secret)]
            )
            assert result.status == grpc.StatusCode.UNAUTHENTICATED.value[0], result
    finally:
        server.stop()
        root.removeHandler(handler)
    log = stream.getvalue()
    assert "SECRETSUFFIX" not in log and TOKEN not in log, log
    assert "Traceback" not in log
    redacted = [line for line in log.splitlines() if "not valid UTF-8" in line]
    assert 1 <= len(redacted) <= 3, "grpc's record is redacted and rate-limited"


def test_auth_rejection_lines_are_rate_limited(
    text_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh limiter: the previous test's rejections must not count against this one.
    monkeypatch.setattr(auth, "REJECTION_LINES", RateLimit(burst=5, interval_s=600.0))
    server = ServerThread(auth_tokens=(TOKEN,))
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for _ in range(100):
                with pytest.raises(grpc.RpcError):
                    stub.Tokenize(
                        pb.TokenizeRequest(text="hi"),
                        metadata=[("authorization", "Bearer wrong-token")],
                        timeout=30,
                    )
    finally:
        server.stop()
    lines = [line for line in text_log.getvalue().splitlines() if "AUTH_TOKEN_REJECTED" in line]
    assert len(lines) == 5, "five lines, then the limiter holds the rest back"


def _call_hostile(address: str) -> None:
    port = int(address.rsplit(":", 1)[1])
    body = rawwire.frame(
        pb.GenerateRequest(
            text="hi", parameters=pb.GenerationParameters(max_new_tokens=2)
        ).SerializeToString()
    )
    rawwire.call(port, "Generate", body)
    rawwire.call(port, "Generate", body, metadata=[(b"grpc-timeout", b"abc")])
    rawwire.call(port, "Generate", body, metadata=[(b"x-odd", b"\xff\xfe")])
    rawwire.call(port, "Generate", rawwire.frame(b"\x0a\x02\xff\xfe"))
    rawwire.call(port, "Generate", body, metadata=[(b"x-request-id", b"a\nb")])


def test_json_log_format_makes_every_line_json() -> None:
    process, address = start_subprocess("--log-level", "INFO")
    try:
        _call_hostile(address)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, stderr
    records: list[dict[str, Any]] = []
    for stream_name, text in (("stdout", stdout), ("stderr", stderr)):
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"not JSON on {stream_name}: {line!r}")
            assert isinstance(entry, dict) and "message" in entry and "level" in entry, line
            records.append(entry)
    loggers = {r["logger"] for r in records}
    assert "peftserve.requests" in loggers
    assert "grpc.core" in loggers, "gRPC core's own line (bad grpc-timeout) is relayed as JSON"


def test_private_attributes_of_record_factories_are_not_fields() -> None:
    """Once ``ray`` is imported, every record carries ``_ray_timestamp_ns`` (Ray installs a
    record factory); such private attributes must not become fields of our lines."""
    from peftserve.server.logs import JsonFormatter

    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record._framework_timestamp_ns = 123  # type: ignore[attr-defined]
        return record

    logging.setLogRecordFactory(factory)
    try:
        record = logging.getLogger("peftserve.requests").makeRecord(
            "peftserve.requests",
            logging.INFO,
            __file__,
            1,
            "request",
            None,
            None,
            extra={"rpc": "Generate", "request_id": "r1"},
        )
    finally:
        logging.setLogRecordFactory(previous)
    text = TextFormatter().format(record)
    assert "_framework_timestamp_ns" not in text
    assert text.endswith("request rpc=Generate request_id=r1")
    fields = json.loads(JsonFormatter().format(record))
    assert "_framework_timestamp_ns" not in fields
    assert fields["rpc"] == "Generate" and fields["request_id"] == "r1"
