"""GenerationService: protobuf in, engine calls, protobuf out — and nothing else.

Errors propagate as domain exceptions to ``interceptor.ErrorMappingInterceptor``; the only
handling here is handing the caller's cancellation and deadline to the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from . import convert
from .engine.engine import RequestHandle
from .engine.errors import DeadlineExceededError, PeftServeError
from .engine.types import GenerationRequest, GenerationResult
from .engine_proc import AnyEngine
from .interceptor import record


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Implements every RPC of ``peftserve.v1.GenerationService`` over the engine."""

    def __init__(self, engine: Callable[[], AnyEngine]) -> None:
        # A callable, not an engine: it raises EngineUnavailableError while loading/draining.
        self._engine = engine

    def _check_queue(self, message: pb.GenerateRequest) -> None:
        """A generation call's first step: refuse it at once when nothing could be admitted
        now (queue full, engine not accepting), before it is converted or validated, so a
        flood costs as little as a refusal can. The record gets the request id the full path
        would have given it (the caller's, or a new one), for the status and the log line."""
        try:
            self._engine().check_queue()
        except PeftServeError:
            entry = record()
            entry.request_id = message.request_id or convert.new_request_id()
            entry.adapter = message.adapter
            raise

    def _request(
        self, message: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> GenerationRequest:
        entry = record()
        entry.request_id = message.request_id
        entry.adapter = message.adapter
        remaining = context.time_remaining()
        deadline = None
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceededError("the deadline passed before the request was read")
            deadline = time.monotonic() + remaining
        request = convert.generation_request(message, deadline)
        entry.request_id = request.request_id
        return request

    @staticmethod
    def _record(result: GenerationResult) -> None:
        entry = record()
        entry.prompt_tokens = result.prompt_tokens
        entry.completion_tokens = result.completion_tokens
        entry.queue_wait_ms = result.queue_wait_ms
        entry.inference_ms = result.inference_ms
        entry.extra["batch_size"] = result.batch_size
        entry.extra["finish_reasons"] = ",".join(s.finish_reason.value for s in result.sequences)

    async def Generate(  # noqa: N802 - gRPC method names are the contract's
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        self._check_queue(request)
        engine_request = self._request(request, context)
        handle = await self._engine().submit_async(engine_request, stream=False)
        result = await _until_done(handle, handle.result())
        self._record(result)
        return convert.generate_response(result, engine_request.options)

    async def StreamGenerate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        started = time.perf_counter()
        self._check_queue(request)
        entry = record()
        engine_request = self._request(request, context)
        handle = await self._engine().submit_async(engine_request, stream=True)
        try:
            async for events in handle.event_batches():
                if "ttft_ms" not in entry.extra:
                    # Time to first token as the caller sees it: queue, prefill, first step.
                    entry.extra["ttft_ms"] = round((time.perf_counter() - started) * 1000, 2)
                for message in convert.stream_deltas(
                    handle.request_id, events, engine_request.options
                ):
                    yield message
            result = await handle.result()
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away (cancel, deadline, disconnect): free the row now.
            handle.cancel()
            raise
        self._record(result)
        yield convert.stream_summary(result, engine_request.options)

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        result = await self._engine().tokenize_async(request.text, request.add_special_tokens)
        return convert.tokenize_response(result)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return convert.model_info_response(self._engine().info)

    async def ListAdapters(  # noqa: N802
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return convert.adapters_response(self._engine().adapter_statuses())

    async def LoadAdapter(  # noqa: N802
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        record().adapter = request.name
        status = await self._engine().load_adapter(request.name, request.path, request.pinned)
        return pb.LoadAdapterResponse(adapter=convert.adapter_message(status))

    async def UnloadAdapter(  # noqa: N802
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        record().adapter = request.name
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        status = await self._engine().unload_adapter(request.name, deadline)
        return pb.UnloadAdapterResponse(adapter=convert.adapter_message(status))

    async def WatchAdapters(  # noqa: N802
        self, request: pb.WatchAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchAdaptersResponse]:
        with self._engine().watch_adapters() as watch:
            for status in watch.snapshot:
                yield convert.existing_adapter_event(status)
            yield pb.WatchAdaptersResponse(kind=pb.ADAPTER_EVENT_KIND_SYNCED)
            while (event := await watch.next_event()) is not None:
                yield convert.adapter_event(event)


async def _until_done(
    handle: RequestHandle, waiter: Coroutine[Any, Any, GenerationResult]
) -> GenerationResult:
    """Await the result; if the caller cancels meanwhile, cancel the engine request too."""
    try:
        return await waiter
    except asyncio.CancelledError:
        handle.cancel()
        raise
