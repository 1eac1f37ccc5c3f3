"""The one exception the client raises for a failed RPC, with the server's rich details.

The server follows AIP-193: a status code, an English message, and ``google.rpc`` details
(``ErrorInfo`` with a stable reason, ``BadRequest`` field violations, ``RetryInfo``). Callers
should not have to unpack ``grpc-status-details-bin`` trailers themselves, so every
``grpc.RpcError`` (sync or asyncio) is turned into a ``PeftServeClientError`` here.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["PeftServeClientError"]


class PeftServeClientError(Exception):
    """A failed peftserve RPC: the status code, message and typed ``google.rpc`` details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        field_violations: list[tuple[str, str]] | None = None,
        retry_after_s: float | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        # ErrorInfo.reason: a stable, machine-readable cause (e.g. "ADAPTER_NOT_FOUND").
        self.reason = reason
        # BadRequest field paths such as "parameters.top_p" (or PreconditionFailure subjects
        # such as "path"), with what is wrong with them.
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        # RetryInfo.retry_delay; None when the server gave no retry advice.
        self.retry_after_s = retry_after_s
        self.request_id = request_id

    @property
    def field(self) -> str:
        """The first offending field path, or "" when the error names none."""
        return self.field_violations[0][0] if self.field_violations else ""

    def __repr__(self) -> str:
        return (
            f"PeftServeClientError(code={self.code.name}, message={self.message!r}, "
            f"reason={self.reason!r}, field_violations={self.field_violations!r}, "
            f"retry_after_s={self.retry_after_s!r}, request_id={self.request_id!r})"
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> PeftServeClientError:
        """Convert a sync ``grpc.RpcError`` or a ``grpc.aio.AioRpcError``.

        Both expose synchronous ``code()``, ``details()`` and ``trailing_metadata()`` once the
        RPC has failed, so one code path serves both flavours.
        """
        call: Any = error
        code = _call_code(call)
        message = _call_details(call)
        status: status_pb2.Status | None = None
        try:
            if callable(getattr(call, "trailing_metadata", None)):
                status = rpc_status.from_call(call)
        except ValueError:
            # The trailer disagrees with the status line (e.g. a proxy rewrote the status):
            # trust the status line and drop the details rather than fail while failing.
            pass
        if status is None:
            return cls(code, message)
        return cls.from_status(code, status)

    @classmethod
    def from_status(cls, code: grpc.StatusCode, status: status_pb2.Status) -> PeftServeClientError:
        """Build the error from a decoded ``google.rpc.Status`` and its packed details."""
        reason = ""
        request_id = ""
        violations: list[tuple[str, str]] = []
        retry_after_s: float | None = None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                request_id = info.metadata.get("request_id", request_id)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend((v.field, v.description) for v in bad_request.field_violations)
            elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
                # FAILED_PRECONDITION names the field at fault as the violation's subject.
                failure = error_details_pb2.PreconditionFailure()
                detail.Unpack(failure)
                violations.extend((v.subject, v.description) for v in failure.violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
        return cls(
            code,
            status.message,
            reason=reason,
            field_violations=violations,
            retry_after_s=retry_after_s,
            request_id=request_id,
        )


def _call_code(call: Any) -> grpc.StatusCode:
    code = call.code() if callable(getattr(call, "code", None)) else None
    # A bare RpcError (not also a Call) carries no status; UNKNOWN is gRPC's own word for that.
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _call_details(call: Any) -> str:
    details = call.details() if callable(getattr(call, "details", None)) else None
    return details if isinstance(details, str) else str(call)
