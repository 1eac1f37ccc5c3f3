"""The asyncio client, twin of ``client.py``: same constructor, methods and results.

Requests are built by ``requests.build_generate_request`` and responses converted by
``responses``, so this file only owns the channel, deadlines, metadata and error conversion.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from .channel import (
    DEFAULT_TARGET,
    ChannelSettings,
    TLSOptions,
    auth_metadata,
    create_aio_channel,
)
from .client import DEFAULT_TIMEOUT_S
from .errors import PeftServeClientError
from .requests import build_generate_request, build_tokenize_request, routing_metadata
from .responses import (
    StreamAssembler,
    adapter_event_from_pb,
    adapter_from_pb,
    adapters_from_pb,
    generation_output_from_pb,
    model_info_from_pb,
    tokenize_output_from_pb,
)
from .types import (
    AdapterEvent,
    AdapterInfo,
    GenerateOptions,
    GenerationOutput,
    ModelInfo,
    SequenceDelta,
    StreamEvent,
    TokenizeOutput,
)

__all__ = ["AsyncPeftServeClient"]


class AsyncPeftServeClient:
    """An asyncio client for ``peftserve.v1.GenerationService``.

    Create it inside the event loop that will use it (gRPC binds an aio channel to its loop).
    Use ``async with``, or ``await close()``. Every failed RPC raises ``PeftServeClientError``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        tls: TLSOptions | bool = False,
        token: str | None = None,
        settings: ChannelSettings | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """Connect lazily to ``target``; the arguments mean what they mean for the sync twin."""
        if settings is None:
            tls_options = TLSOptions() if tls is True else (tls or None)
            settings = ChannelSettings(tls=tls_options, token=token)
        self.target = target
        self.timeout_s = timeout_s
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else create_aio_channel(target, settings)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._metadata = auth_metadata(settings)

    async def __aenter__(self) -> AsyncPeftServeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (if this client created it); in-flight calls are cancelled."""
        if self._owns_channel:
            await self._channel.close()

    def _call_kwargs(self, timeout_s: float | None, adapter: str = "") -> dict[str, Any]:
        # A call naming an adapter carries it as routing metadata too (adapter affinity on
        # Ray Serve); the server refuses a call whose metadata and adapter field disagree.
        metadata = self._metadata + routing_metadata(adapter)
        return {
            "timeout": timeout_s if timeout_s is not None else self.timeout_s,
            "metadata": metadata or None,
        }

    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout_s: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> GenerationOutput:
        """Generate a whole response; see ``build_generate_request`` for the keywords."""
        request = build_generate_request(prompt, **options)
        try:
            response = await self._stub.Generate(
                request, **self._call_kwargs(timeout_s, request.adapter)
            )
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        return generation_output_from_pb(response)

    async def stream_events(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout_s: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerator[StreamEvent, None]:
        """Yield a ``SequenceDelta`` per message, then one ``StreamSummary`` with the result.

        Leaving the loop early (``break``, ``aclose()``, task cancellation) cancels the RPC,
        so the server stops generating for a caller that no longer listens.
        """
        request = build_generate_request(prompt, **options)
        assembler = StreamAssembler()
        call = self._stub.StreamGenerate(request, **self._call_kwargs(timeout_s, request.adapter))
        try:
            async for message in call:
                event = assembler.feed(message)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        finally:
            if not assembler.finished:
                call.cancel()

    async def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout_s: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerator[str, None]:
        """Yield the text deltas of sequence 0 as they are decoded (empty deltas skipped)."""
        events = self.stream_events(prompt, timeout_s=timeout_s, **options)
        try:
            async for event in events:
                if isinstance(event, SequenceDelta) and event.index == 0 and event.text:
                    yield event.text
        finally:
            await events.aclose()

    async def tokenize(
        self, text: str, add_special_tokens: bool = True, *, timeout_s: float | None = None
    ) -> TokenizeOutput:
        """Tokenize ``text`` with the served model's tokenizer."""
        request = build_tokenize_request(text, add_special_tokens)
        try:
            response = await self._stub.Tokenize(request, **self._call_kwargs(timeout_s))
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        return tokenize_output_from_pb(response)

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """Describe the served model and the server's limits."""
        try:
            response = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), **self._call_kwargs(timeout_s)
            )
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        return model_info_from_pb(response)

    async def list_adapters(self, *, timeout_s: float | None = None) -> tuple[AdapterInfo, ...]:
        """The adapters requests may name, sorted by name."""
        try:
            response = await self._stub.ListAdapters(
                pb.ListAdaptersRequest(), **self._call_kwargs(timeout_s)
            )
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        return adapters_from_pb(response)

    async def load_adapter(
        self, name: str, path: str = "", *, pinned: bool = False, timeout_s: float | None = None
    ) -> AdapterInfo:
        """Load the adapter directory ``path`` (relative to the server's adapters root; default
        ``name``) as ``name``; returns it READY. Needs an admin token where the server has them.
        """
        request = pb.LoadAdapterRequest(name=name, path=path, pinned=pinned)
        try:
            response = await self._stub.LoadAdapter(request, **self._call_kwargs(timeout_s, name))
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        return adapter_from_pb(response.adapter)

    async def unload_adapter(self, name: str, *, timeout_s: float | None = None) -> AdapterInfo:
        """Unload ``name`` once its in-flight requests finish (within the deadline); returns
        its last description."""
        request = pb.UnloadAdapterRequest(name=name)
        try:
            response = await self._stub.UnloadAdapter(request, **self._call_kwargs(timeout_s))
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        return adapter_from_pb(response.adapter)

    async def watch_adapters(
        self, *, timeout_s: float | None = None
    ) -> AsyncGenerator[AdapterEvent, None]:
        """Yield the current adapters ("existing"), a "synced" marker, then every change.

        Runs until the deadline (``timeout_s``, else the client's; None on both = forever);
        leaving the loop early cancels the RPC.
        """
        call = self._stub.WatchAdapters(pb.WatchAdaptersRequest(), **self._call_kwargs(timeout_s))
        try:
            async for message in call:
                yield adapter_event_from_pb(message)
        except grpc.RpcError as error:
            raise PeftServeClientError.from_rpc_error(error) from error
        finally:
            call.cancel()
