"""A replica call's gRPC context: the part of ``grpc.aio.ServicerContext`` the server code uses.

The plain server's servicer reads the caller's deadline (``time_remaining``) and its
interceptor ends failed calls with ``abort_with_status``; on Ray Serve the call arrives as a
``RayServegRPCContext`` instead. This adapter gives both what they expect: the deadline comes
from the ``peftserve-timeout-ms`` metadata the proxy hook adds (see ``proxy.py``), and an abort
puts the status, message and ``google.rpc`` trailers on Ray's context, where the proxy copies
them onto the caller's call together with the (empty) response message.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import grpc

from .proxy import TIMEOUT_METADATA_KEY


class ReplicaCallContext:
    """One call on a replica: its metadata, its deadline, and a way to end it with a status."""

    def __init__(self, ray_context: Any) -> None:
        self._ray_context = ray_context
        received = time.monotonic()
        self._metadata: tuple[tuple[str, Any], ...] = tuple(ray_context.invocation_metadata())
        self._deadline: float | None = None
        raw = dict(self._metadata).get(TIMEOUT_METADATA_KEY)
        if isinstance(raw, str) and raw.isdigit():
            self._deadline = received + int(raw) / 1000

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline; None when the caller set none."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def set_status(self, status: grpc.Status) -> None:
        """Put ``status`` (code, message, trailers) on the call; the handler then returns."""
        self.set_error(status.code, status.details, status.trailing_metadata or ())

    def set_error(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self._ray_context.set_code(code)
        self._ray_context.set_details(details)
        self._ray_context.set_trailing_metadata(list(trailing_metadata))

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.set_status(status)
        raise grpc.aio.AbortError()

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        self.set_error(code, details, trailing_metadata)
        raise grpc.aio.AbortError()
