"""One server interceptor: maps exceptions to statuses and writes one log line per request.

Servicer methods carry no try/except: a ``PeftServeError`` raised anywhere below becomes its
rich status here, anything unexpected becomes INTERNAL (traceback logged, never sent). The
servicer fills in the per-request ``RequestRecord`` (id, adapter, tokens, timings) through a
context variable, and the line is written here once the final status is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from .engine.errors import PeftServeError
from .errors import MalformedMessageError, internal_status, status_code_for, to_grpc_status
from .logs import RateLimit

logger = logging.getLogger("peftserve.requests")
# A flood beyond the queue must not become a flood of log lines (nor cost the event loop a
# formatted line per refusal): at most this many QUEUE_FULL request lines a second; the next
# line written says how many were held back. The metrics count every one.
OVERLOAD_LINES = RateLimit(burst=20, interval_s=1.0)


@dataclass
class RequestRecord:
    """What the request log line says about one RPC; the servicer fills it in."""

    method: str
    request_id: str = ""
    adapter: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait_ms: float = 0.0
    inference_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # perf_counter() when the interceptor took the call: the log line's total_ms and the
    # request duration metric both measure from here.
    started_s: float = field(default_factory=time.perf_counter)


class RequestObserver(Protocol):
    """Told when each RPC starts and ends (metrics); called on the event loop."""

    def started(self, entry: RequestRecord) -> None: ...

    def finished(self, entry: RequestRecord, status: str) -> None: ...


current_record: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "peftserve_request_record", default=None
)


def record() -> RequestRecord:
    """The record of the RPC being handled (a throwaway one outside an RPC)."""
    existing = current_record.get()
    return existing if existing is not None else RequestRecord(method="")


def _log(entry: RequestRecord, status: str, started: float) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    if entry.extra.get("reason") == "QUEUE_FULL":
        suppressed = OVERLOAD_LINES.allow()
        if suppressed is None:
            return
        if suppressed:
            entry.extra["suppressed"] = suppressed
    logger.info(
        "request",
        extra={
            "rpc": entry.method,
            "request_id": entry.request_id,
            "adapter": entry.adapter,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "queue_wait_ms": round(entry.queue_wait_ms, 2),
            "inference_ms": round(entry.inference_ms, 2),
            "total_ms": round((time.perf_counter() - started) * 1000, 2),
            "status": status,
            **entry.extra,
        },
    )


async def _abort(
    context: grpc.aio.ServicerContext, error: BaseException, entry: RequestRecord
) -> None:
    if isinstance(error, PeftServeError):
        status = to_grpc_status(error, entry.request_id)
    else:
        logger.error(
            "unexpected failure in %s (request_id %s)",
            entry.method,
            entry.request_id,
            exc_info=error,
        )
        status = internal_status(entry.request_id)
    await context.abort_with_status(status)


def _status_name(error: BaseException) -> str:
    if isinstance(error, PeftServeError):
        return status_code_for(error).name
    return grpc.StatusCode.INTERNAL.name


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every peftserve handler (health and reflection pass through untouched)."""

    def __init__(
        self,
        service_prefix: str,
        observer: RequestObserver | None = None,
        stream_stall_timeout_s: float = 0.0,
    ) -> None:
        self._prefix = service_prefix
        self._observer = observer
        self._stall_timeout_s = stream_stall_timeout_s
        # method -> (the handler grpc resolved, our wrapper of it): grpc resolves the same
        # handler object for every call of a method, so the wrapper is built once, not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        if handler is not None:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler is None or not method.startswith(self._prefix):
            return handler
        short_name = method.rsplit("/", 1)[-1]
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, short_name, self._observer),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(
                    handler.unary_stream, short_name, self._observer, self._stall_timeout_s
                ),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request whose bytes did not parse; the wrapper turns it into an error."""

    problem: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns ``_Malformed`` instead of raising.

    grpc calls it before any handler runs; a ``DecodeError`` raised here became UNKNOWN with
    the Python class name, an ERROR traceback, and no request log line or metric.
    """
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            # protobuf's text names the message type and the problem, never the caller's bytes.
            return _Malformed(str(error))

    return deserialize


def _check_parsed(request: Any) -> None:
    if isinstance(request, _Malformed):
        raise MalformedMessageError(request.problem)


def _reset(token: contextvars.Token[RequestRecord | None]) -> None:
    # An abandoned stream may be finalised from another context; the record is dropped anyway.
    with contextlib.suppress(ValueError):
        current_record.reset(token)


@contextlib.asynccontextmanager
async def _rpc_scope(
    method: str, context: grpc.aio.ServicerContext, observer: RequestObserver | None
) -> AsyncIterator[None]:
    """One RPC's record, error mapping, log line and metrics, for unary and streaming alike."""
    entry = RequestRecord(method=method)
    token = current_record.set(entry)
    if observer is not None:
        observer.started(entry)
    status = "OK"
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        # GeneratorExit: a stream whose caller left while a write was pending is closed by
        # grpc (or the garbage collector) at its yield; nothing was sent after that.
        status = grpc.StatusCode.CANCELLED.name
        raise
    except grpc.aio.AbortError:
        status = "ABORTED_BY_HANDLER"
        raise
    except Exception as error:
        status = _status_name(error)
        if isinstance(error, PeftServeError):
            entry.extra.setdefault("reason", error.reason)
        await _abort(context, error, entry)
    finally:
        _log(entry, status, entry.started_s)
        if observer is not None:
            observer.finished(entry, status)
        _reset(token)


def _wrap_unary(
    behavior: Callable[..., Any], method: str, observer: RequestObserver | None
) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _rpc_scope(method, context, observer):
            _check_parsed(request)
            return await behavior(request, context)

    return wrapper


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]],
    method: str,
    observer: RequestObserver | None,
    stall_timeout_s: float = 0.0,
) -> Callable[..., Any]:
    """Stream wrapper; a message whose write has not completed within ``stall_timeout_s``
    (the caller stopped reading, perhaps while still answering keepalive pings) cancels the
    call, so the output it holds is freed. 0 = no limit."""

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _rpc_scope(method, context, observer):
            _check_parsed(request)
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            entry = record()

            def stalled() -> None:
                entry.extra["reason"] = "STREAM_STALLED"
                logger.warning(
                    "cancelling %s (request_id %s): a message has waited %.0fs for the caller "
                    "to read it",
                    method,
                    entry.request_id,
                    stall_timeout_s,
                )
                if task is not None:
                    task.cancel()

            async for response in behavior(request, context):
                timer = loop.call_later(stall_timeout_s, stalled) if stall_timeout_s > 0 else None
                try:
                    yield response
                finally:
                    if timer is not None:
                        timer.cancel()

    return wrapper
