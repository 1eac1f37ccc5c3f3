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

from .engine.errors import PeftServeError
from .errors import internal_status, status_code_for, to_grpc_status

logger = logging.getLogger("peftserve.requests")


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

    def __init__(self, service_prefix: str, observer: RequestObserver | None = None) -> None:
        self._prefix = service_prefix
        self._observer = observer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        short_name = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, short_name, self._observer),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, short_name, self._observer),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


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
    except asyncio.CancelledError:
        status = grpc.StatusCode.CANCELLED.name
        raise
    except grpc.aio.AbortError:
        status = "ABORTED_BY_HANDLER"
        raise
    except Exception as error:
        status = _status_name(error)
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
            return await behavior(request, context)

    return wrapper


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]], method: str, observer: RequestObserver | None
) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _rpc_scope(method, context, observer):
            async for response in behavior(request, context):
                yield response

    return wrapper
