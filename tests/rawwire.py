"""A raw HTTP/2 gRPC client (``h2``) that sends what no gRPC library would: bad headers and frames.

Used by the hostile-wire tests and the fuzz corpus: malformed ``grpc-timeout``, non-UTF-8
metadata, corrupt length prefixes, invalid protobuf. It reports the ``grpc-status`` (or the
HTTP/2 reset) that came back, so a test can assert it is never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

SERVICE = "/peftserve.v1.GenerationService/"


def frame(message: bytes, compressed: bool = False, length: int | None = None) -> bytes:
    """One gRPC length-prefixed message (the prefix may lie about the length)."""
    size = len(message) if length is None else length
    return struct.pack(">BI", 1 if compressed else 0, size) + message


@dataclass
class RawResult:
    """What came back on the stream: gRPC status (None = no status), or an HTTP/2 reset."""

    status: int | None = None
    message: str = ""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    reset_code: int | None = None
    connection_closed: bool = False
    # Nothing came back in time (the client then reset the stream).
    unanswered: bool = False


def call(
    port: int,
    method: str,
    body: bytes = b"",
    *,
    metadata: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    headers: list[tuple[bytes, bytes]] | None = None,
    timeout_s: float = 30.0,
    end_stream: bool = True,
) -> RawResult:
    """Send one request on a fresh connection to 127.0.0.1:``port`` and read the outcome.

    ``headers`` replaces the standard request headers entirely; ``metadata`` is appended.
    """
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    connection = h2.connection.H2Connection(config=config)
    result = RawResult()
    path = method if method.startswith("/") else SERVICE + method
    if headers is None:
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        connection.initiate_connection()
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(
            stream_id, [*headers, *metadata], end_stream=not body and end_stream
        )
        if body:
            connection.send_data(stream_id, body, end_stream=end_stream)
        sock.sendall(connection.data_to_send())
        end = time.monotonic() + timeout_s
        done = False
        while not done and time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                result.connection_closed = True
                break
            for event in connection.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    for name, value in event.headers:
                        result.headers[bytes(name)] = bytes(value)
                    if isinstance(event, h2.events.TrailersReceived) or event.stream_ended:
                        done = done or b"grpc-status" in result.headers
                elif isinstance(event, h2.events.DataReceived):
                    result.data += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    result.reset_code = int(event.error_code)
                    done = True
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    result.connection_closed = True
                    done = True
            pending = connection.data_to_send()
            if pending:
                sock.sendall(pending)
    if b"grpc-status" in result.headers:
        result.status = int(result.headers[b"grpc-status"])
        result.message = urllib.parse.unquote(
            result.headers.get(b"grpc-message", b"").decode("ascii", "replace")
        )
    return result


class StalledStream:
    """A stream whose caller never reads: a tiny flow-control window that it never opens,
    while the connection stays alive (pings are answered). ``open`` reads it to the end."""

    def __init__(self, port: int, method: str, body: bytes, window: int = 16) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._h2.initiate_connection()
        self.stream_id = self._h2.get_next_available_stream_id()
        path = SERVICE + method
        self._h2.send_headers(
            self.stream_id,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", f"127.0.0.1:{port}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
        )
        self._h2.send_data(self.stream_id, body, end_stream=True)
        self._sock.sendall(self._h2.data_to_send())
        self.result = RawResult()

    def pump(self, seconds: float) -> None:
        """Answer pings and settings for ``seconds`` without taking any data."""
        end = time.monotonic() + seconds
        self._sock.settimeout(0.1)
        while time.monotonic() < end:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                self.result.connection_closed = True
                return
            self._handle(self._h2.receive_data(chunk), acknowledge=False)
            pending = self._h2.data_to_send()
            if pending:
                self._sock.sendall(pending)

    def _handle(self, events: list[h2.events.Event], acknowledge: bool) -> bool:
        done = False
        for event in events:
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                for name, value in event.headers:
                    self.result.headers[bytes(name)] = bytes(value)
            elif isinstance(event, h2.events.DataReceived):
                self.result.data += event.data
                if acknowledge:
                    self._h2.acknowledge_received_data(event.flow_controlled_length, self.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.result.reset_code = int(event.error_code)
                done = True
            elif isinstance(event, h2.events.StreamEnded | h2.events.ConnectionTerminated):
                done = True
        return done

    def open(self, timeout_s: float = 30.0) -> RawResult:
        """Open the window wide and read the stream to its end."""
        self._h2.increment_flow_control_window(2**30, stream_id=self.stream_id)
        self._h2.increment_flow_control_window(2**30)
        self._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
        self._sock.sendall(self._h2.data_to_send())
        self._sock.settimeout(timeout_s)
        done = False
        while not done:
            chunk = self._sock.recv(65536)
            if not chunk:
                break
            done = self._handle(self._h2.receive_data(chunk), acknowledge=True)
            pending = self._h2.data_to_send()
            if pending:
                self._sock.sendall(pending)
        if b"grpc-status" in self.result.headers:
            self.result.status = int(self.result.headers[b"grpc-status"])
            self.result.message = urllib.parse.unquote(
                self.result.headers.get(b"grpc-message", b"").decode("ascii", "replace")
            )
        return self.result

    def abandon(self) -> None:
        """Leave without a word: close the socket with the write still pending."""
        self._sock.close()


@dataclass
class Case:
    """One raw request: method path, body bytes, extra metadata (or replacement headers)."""

    method: str
    body: bytes = b""
    metadata: list[tuple[bytes, bytes]] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] | None = None


class Connection:
    """One HTTP/2 connection that sends raw cases one stream at a time; reconnects when the
    server ends the connection (some malformed headers are connection errors)."""

    def __init__(self, port: int, timeout_s: float = 30.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.reconnects = 0
        self._open()

    def _open(self) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout_s)
        self._h2.initiate_connection()
        self._sock.sendall(self._h2.data_to_send())

    def close(self) -> None:
        self._sock.close()

    def send(self, case: Case, timeout_s: float | None = None) -> RawResult:
        """Send ``case``; with ``timeout_s``, a stream still unanswered then is reset by us."""
        try:
            return self._send(case, self.timeout_s if timeout_s is None else timeout_s)
        except TimeoutError:
            try:
                self._h2.reset_stream(self._stream_id)
                self._sock.sendall(self._h2.data_to_send())
                return RawResult(unanswered=True)
            except (h2.exceptions.ProtocolError, OSError):
                result = RawResult(unanswered=True)
        except (h2.exceptions.ProtocolError, OSError):
            result = RawResult(connection_closed=True)
        self._reconnect()
        return result

    def _reconnect(self) -> None:
        self.reconnects += 1
        self.close()
        self._open()

    def _send(self, case: Case, timeout_s: float) -> RawResult:
        result = RawResult()
        stream_id = self._stream_id = self._h2.get_next_available_stream_id()
        path = case.method if case.method.startswith("/") else SERVICE + case.method
        headers = case.headers
        if headers is None:
            headers = [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", f"127.0.0.1:{self.port}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ]
        self._h2.send_headers(stream_id, [*headers, *case.metadata], end_stream=not case.body)
        if case.body:
            self._h2.send_data(stream_id, case.body, end_stream=True)
        self._sock.sendall(self._h2.data_to_send())
        end = time.monotonic() + timeout_s
        done = False
        while not done:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no outcome for {case.method} within {timeout_s}s")
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                result.connection_closed = True
                self._reconnect()
                break
            for event in self._h2.receive_data(chunk):
                if getattr(event, "stream_id", stream_id) not in (stream_id, 0):
                    continue
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    for name, value in event.headers:
                        result.headers[bytes(name)] = bytes(value)
                elif isinstance(event, h2.events.DataReceived):
                    result.data += event.data
                    self._h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    result.reset_code = int(event.error_code)
                    done = True
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    result.connection_closed = True
                    done = True
            pending = self._h2.data_to_send()
            if pending:
                self._sock.sendall(pending)
        if result.connection_closed and done:
            self._reconnect()
        if b"grpc-status" in result.headers:
            result.status = int(result.headers[b"grpc-status"])
            result.message = urllib.parse.unquote(
                result.headers.get(b"grpc-message", b"").decode("ascii", "replace")
            )
        return result
