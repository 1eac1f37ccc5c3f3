"""The one place where domain errors become gRPC statuses with ``google.rpc`` details.

AIP-193: the most specific code, an English message for developers, ``ErrorInfo`` with a
stable ``reason``, ``BadRequest`` field violations for invalid fields, ``RetryInfo`` where a
retry may succeed. Unexpected exceptions become INTERNAL with no traceback sent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .engine.errors import (
    AdapterBudgetError,
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterPathNotFoundError,
    AdapterStateError,
    BatchOutOfMemoryError,
    ChatTemplateMissingError,
    ConstraintTimeoutError,
    DeadlineExceededError,
    EngineUnavailableError,
    FieldViolation,
    InvalidRequestError,
    PeftServeError,
    QueueFullError,
    RequestCancelledError,
    SlowConsumerError,
)

ERROR_DOMAIN = "peftserve.v1"


class MalformedMessageError(InvalidRequestError):
    """The request bytes are not a valid protobuf message of the method's request type
    (corrupt wire format, invalid UTF-8 in a string field): INVALID_ARGUMENT."""

    reason = "MALFORMED_MESSAGE"

    def __init__(self, problem: str) -> None:
        # The field path is empty: the message as a whole could not be read.
        super().__init__([FieldViolation("", f"the request message is not valid: {problem}")])
        self.message = f"the request message is not valid: {problem}"


# Most specific first: subclasses precede their bases.
_CODES: tuple[tuple[type[PeftServeError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterPathNotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BatchOutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
    (AdapterLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (AdapterBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ConstraintTimeoutError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ChatTemplateMissingError, grpc.StatusCode.FAILED_PRECONDITION),
    (SlowConsumerError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_code_for(error: PeftServeError) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


# Error trailers echo caller input (names, paths, texts). A client refuses trailers beyond its
# metadata limit (grpc's default soft limit is 8 KiB, hard 16 KiB) and then sees
# RESOURCE_EXHAUSTED instead of the real status, so every echoed string is clipped. Worst case,
# percent-encoded message plus base64 details, stays near 5 KiB.
MAX_MESSAGE_BYTES = 400
MAX_DETAIL_BYTES = 160
MAX_VIOLATIONS = 6


def clip(text: str, max_bytes: int = MAX_DETAIL_BYTES) -> str:
    """``text`` cut to ``max_bytes`` UTF-8 bytes (on a character boundary), marked with '...'."""
    if len(text) * 4 <= max_bytes or len(encoded := text.encode("utf-8", "replace")) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode("utf-8", "ignore") + "..."


def _violations(violations: tuple[FieldViolation, ...]) -> list[Any]:
    kept = [
        error_details_pb2.BadRequest.FieldViolation(
            field=clip(v.field), description=clip(v.description)
        )
        for v in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:
        kept.append(
            error_details_pb2.BadRequest.FieldViolation(
                field="", description=f"and {len(violations) - MAX_VIOLATIONS} more violations"
            )
        )
    return kept


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_grpc_status(error: PeftServeError, request_id: str = "") -> grpc.Status:
    """Build the rich status for a domain error."""
    if isinstance(error, QueueFullError):
        return _queue_full_status(error, request_id)
    code = status_code_for(error)
    metadata = {"request_id": clip(request_id, 128)} if request_id else {}
    details: list[any_pb2.Any] = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
    ]
    if isinstance(error, InvalidRequestError):
        bad_request = error_details_pb2.BadRequest(field_violations=_violations(error.violations))
        details.append(_pack(bad_request))
    elif isinstance(error, AdapterNotFoundError):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="adapter", description=clip(error.message)
                        )
                    ]
                )
            )
        )
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type="adapter",
                    resource_name=clip(error.adapter),
                    description=clip(error.message),
                )
            )
        )
    elif isinstance(error, AdapterPathNotFoundError):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=error.field, description=clip(error.message)
                        )
                    ]
                )
            )
        )
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type="adapter directory",
                    resource_name=clip(error.path),
                    description=clip(error.message),
                )
            )
        )
    elif isinstance(error, AdapterLoadError):
        # FAILED_PRECONDITION's detail per AIP-193; the subject is the request field at fault
        # (LoadAdapter's "path") when the caller chose the directory, else the adapter.
        details.append(
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type="ADAPTER_DIRECTORY",
                            subject=clip(error.field or f"adapter/{error.adapter}"),
                            description=clip(error.detail),
                        )
                    ]
                )
            )
        )
    elif isinstance(error, ChatTemplateMissingError):
        details.append(
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type="CHAT_TEMPLATE",
                            subject=clip(error.field),
                            description=clip(error.message),
                        )
                    ]
                )
            )
        )
    elif isinstance(error, ConstraintTimeoutError):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=clip(error.field), description=clip(error.message)
                        )
                    ]
                )
            )
        )
    return rpc_status.to_status(
        status_pb2.Status(
            code=code.value[0], message=clip(error.message, MAX_MESSAGE_BYTES), details=details
        )
    )


def _queue_full_status(error: QueueFullError, request_id: str) -> grpc.Status:
    """``to_grpc_status`` for QUEUE_FULL, the one built for every call of a flood: the same
    bytes, spliced from parts built once per message and retry hint.

    A serialized message is its fields in field order, and repeated fields may come in
    several pieces, so ``Status(code, message) + Status(details=[ErrorInfo]) +
    Status(details=[RetryInfo])`` is exactly ``Status(code, message, details=[both])``
    serialized (``tests/server/test_errors.py`` compares them).
    """
    pushback_ms = max(1, int(error.retry_after_s * 1000))
    message = clip(error.message, MAX_MESSAGE_BYTES)
    head, retry_tail = _queue_full_parts(message, pushback_ms)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        domain=ERROR_DOMAIN,
        metadata={"request_id": clip(request_id, 128)} if request_id else None,
    )
    middle = status_pb2.Status(details=[_pack(info)]).SerializeToString()
    return _WithTrailers(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        (
            (rpc_status.GRPC_DETAILS_METADATA_KEY, head + middle + retry_tail),
            # gRPC's built-in retry ignores RetryInfo but honours this trailer, so clients
            # with a retry policy back off as long as the server asks.
            ("grpc-retry-pushback-ms", str(pushback_ms)),
        ),
    )


@functools.lru_cache(maxsize=256)
def _queue_full_parts(message: str, pushback_ms: int) -> tuple[bytes, bytes]:
    head = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    retry_delay = duration_pb2.Duration()
    retry_delay.FromMilliseconds(pushback_ms)
    tail = status_pb2.Status(details=[_pack(error_details_pb2.RetryInfo(retry_delay=retry_delay))])
    return head.SerializeToString(), tail.SerializeToString()


@dataclass(frozen=True)
class _WithTrailers(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def reason_status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str] | None = None
) -> grpc.Status:
    """A status whose only detail is ``ErrorInfo``: for errors raised outside the engine.

    The auth interceptor uses it, so its rejections read exactly like every other error.
    """
    status = status_pb2.Status(
        code=code.value[0],
        message=message,
        details=[
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {}
                )
            )
        ],
    )
    return rpc_status.to_status(status)


def internal_status(request_id: str) -> grpc.Status:
    """INTERNAL without any detail of the failure: those go to the log, keyed by request id."""
    message = "internal error"
    if request_id:
        message += f" (request_id {request_id}; details are in the server log)"
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=message,
        details=[
            _pack(
                error_details_pb2.ErrorInfo(
                    reason="INTERNAL",
                    domain=ERROR_DOMAIN,
                    metadata={"request_id": request_id} if request_id else {},
                )
            )
        ],
    )
    return rpc_status.to_status(status)
