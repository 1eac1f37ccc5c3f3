"""The proxy-side pieces without a cluster: deadline metadata, status carriers, the replica's
view of a call (none of them imports Ray)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from peftserve.ray.context import ReplicaCallContext
from peftserve.ray.proxy import (
    REPLICA_LOST_MESSAGE,
    TIMEOUT_METADATA_KEY,
    _DeadlineForwardingContext,
    _server_stream,
    _unary,
)


class FakeCall:
    """What Ray's proxy hands a handler: the caller's metadata, deadline and final status."""

    def __init__(self, metadata: list[tuple[str, str]], remaining: float | None) -> None:
        self._metadata = metadata
        self._remaining = remaining
        self.peer_value = "ipv4:127.0.0.1:1"
        self.status: Any = None
        self.message = ""

    def code(self) -> Any:
        return self.status

    def details(self) -> str:
        return self.message

    def set_code(self, code: Any) -> None:
        self.status = code

    def set_details(self, details: str) -> None:
        self.message = details

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return self._remaining

    def peer(self) -> str:
        return self.peer_value


def forwarded(metadata: list[tuple[str, str]], remaining: float | None) -> dict[str, str]:
    return dict(_DeadlineForwardingContext(FakeCall(metadata, remaining)).invocation_metadata())


def test_the_callers_deadline_travels_as_metadata() -> None:
    assert forwarded([("a", "b")], 2.5) == {"a": "b", TIMEOUT_METADATA_KEY: "2500"}
    assert TIMEOUT_METADATA_KEY not in forwarded([], None)
    # A caller may ask for less, never for more, and garbage is dropped.
    assert forwarded([(TIMEOUT_METADATA_KEY, "300")], 2.5)[TIMEOUT_METADATA_KEY] == "300"
    assert forwarded([(TIMEOUT_METADATA_KEY, "9000")], 2.5)[TIMEOUT_METADATA_KEY] == "2500"
    assert forwarded([(TIMEOUT_METADATA_KEY, "300")], None)[TIMEOUT_METADATA_KEY] == "300"
    assert TIMEOUT_METADATA_KEY not in forwarded([(TIMEOUT_METADATA_KEY, "-5")], None)
    # Everything else is the real call's.
    assert _DeadlineForwardingContext(FakeCall([], None)).peer() == "ipv4:127.0.0.1:1"


def test_status_carriers_never_reach_the_caller() -> None:
    async def replica_stream(request: Any, context: Any) -> AsyncIterator[bytes]:
        yield b"\x0a\x01a"
        yield b""  # the status carrier

    async def collect() -> list[bytes]:
        handler = _server_stream(replica_stream)
        return [m async for m in handler(None, FakeCall([], None))]

    assert asyncio.run(collect()) == [b"\x0a\x01a"]


class FakeRayContext:
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata
        self.code: Any = None
        self.details = ""
        self.trailers: list[Any] = []

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailers: list[Any]) -> None:
        self.trailers = trailers


def test_the_replica_reads_the_deadline_and_keeps_the_status() -> None:
    assert ReplicaCallContext(FakeRayContext([])).time_remaining() is None
    remaining = ReplicaCallContext(
        FakeRayContext([(TIMEOUT_METADATA_KEY, "5000")])
    ).time_remaining()
    assert remaining is not None and 4.0 < remaining <= 5.0
    assert ReplicaCallContext(FakeRayContext([(TIMEOUT_METADATA_KEY, "0")])).time_remaining() == 0

    ray_context = FakeRayContext([])
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(
            ReplicaCallContext(ray_context).abort(
                grpc.StatusCode.NOT_FOUND, "gone", (("grpc-status-details-bin", b"x"),)
            )
        )
    assert ray_context.code == grpc.StatusCode.NOT_FOUND and ray_context.details == "gone"
    assert ray_context.trailers == [("grpc-status-details-bin", b"x")]


def test_a_replica_lost_mid_call_is_unavailable_without_its_address() -> None:
    async def dying_replica(request: Any, context: Any) -> bytes:
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details("The actor died unexpectedly before finishing this task.\n\tpid: 7")
        return b""

    async def our_internal(request: Any, context: Any) -> bytes:
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details("internal error (request_id r-1; details are in the server log)")
        return b""

    lost = FakeCall([], None)
    asyncio.run(_unary(dying_replica)(None, lost))
    assert lost.status == grpc.StatusCode.UNAVAILABLE and lost.message == REPLICA_LOST_MESSAGE
    ours = FakeCall([], None)
    asyncio.run(_unary(our_internal)(None, ours))
    assert ours.status == grpc.StatusCode.INTERNAL
