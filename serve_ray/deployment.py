"""The Ray Serve deployment: one engine per replica, serving the unchanged gRPC contract.

Ray's gRPC proxy calls the replica method named like the RPC (``Generate``, ``Check``, ...)
with the request message and Ray's gRPC context. Each method here runs the plain server's own
code: ``GenerationServicer`` for protobuf <-> engine, wrapped by the same
``ErrorMappingInterceptor`` that maps domain errors to ``google.rpc`` statuses and logs one
line per request. What is Ray-specific lives here and only here:

- adapter affinity: the adapter is Ray's multiplexed model id. A replica loads an adapter
  lazily from the shared adapters root the first time a request names it, reports it to Ray's
  router (so later requests for it prefer this replica), and the engine's registry bounds the
  loaded adapters per replica (``max_loaded_adapters``, least recently used idle adapter
  evicted; never a pinned one or one a request still uses);
- the routing metadata and the request's ``adapter`` field must agree (INVALID_ARGUMENT);
- ``Provenance.replica`` names the replica that served a generation;
- LoadAdapter warms one replica; UnloadAdapter and WatchAdapters are UNIMPLEMENTED, because a
  per-replica answer would silently describe one replica of many (docs/deploy.md);
- drain: Ray stops routing to a replica, waits ``graceful_shutdown_timeout_s`` for its ongoing
  requests, then calls ``__del__``, which drains and stops the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import ray
from grpc_health.v1 import health_pb2
from peftserve.server.app import SERVICE_NAME
from peftserve.server.config import DEMO_ADAPTERS_DIR, DEMO_MODEL_PATH
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.engine import Engine
from peftserve.server.engine.errors import InvalidRequestError
from peftserve.server.engine.types import AdapterEvent, AdapterEventKind, AdapterState
from peftserve.server.errors import reason_status
from peftserve.server.interceptor import ErrorMappingInterceptor
from peftserve.server.servicer import GenerationServicer
from peftserve.v1 import generation_pb2 as pb
from ray import serve

from .context import ReplicaCallContext
from .metrics import ReplicaMetrics

logger = logging.getLogger("peftserve.ray")

DEPLOYMENT_NAME = "PeftServe"
# Ray's attribute for a method's multiplex wrapper (set by @serve.multiplexed, not mangled).
_MULTIPLEX_ATTRIBUTE = "__serve_multiplex_wrapper"
# Engine defaults that differ on Ray Serve: adapters load on demand on each replica, and a
# replica keeps a bounded hot set instead of every adapter of the root.
RAY_ENGINE_DEFAULTS: Mapping[str, Any] = {
    "lazy_load_adapters": True,
    "preload_adapters": False,
    "max_loaded_adapters": 8,
}


def engine_config(options: Mapping[str, Any] | None = None) -> EngineConfig:
    """An ``EngineConfig`` from the deployment's ``engine`` argument (YAML-friendly values).

    Unset: the demo model and its adapters (source checkout), ``RAY_ENGINE_DEFAULTS``, and
    ``device: auto`` meaning the replica's GPU when Ray assigned one, else the CPU (a replica
    never takes a GPU that Ray did not give it).
    """
    values: dict[str, Any] = {
        "model_path": DEMO_MODEL_PATH,
        "adapters_dir": DEMO_ADAPTERS_DIR,
        **RAY_ENGINE_DEFAULTS,
        **(options or {}),
    }
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown engine options: {', '.join(unknown)}")
    for name in ("model_path", "adapters_dir"):
        if values[name] is not None:
            values[name] = Path(values[name])
    if isinstance(values.get("pinned_adapters"), list | str):
        pinned = values["pinned_adapters"]
        values["pinned_adapters"] = tuple(pinned.split(",") if isinstance(pinned, str) else pinned)
    if values.get("device", "auto") == "auto":
        # Outside a Ray worker (tests, tools) there are no assigned GPUs; asking would start
        # a Ray instance (Ray's calls initialise one on demand).
        assigned = ray.is_initialized() and bool(ray.get_gpu_ids())
        values["device"] = "cuda:0" if assigned else "cpu"
    return EngineConfig(**values)


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


_Behavior = Callable[[Any, Any], Any]


class PeftServeReplica:
    """One replica: an engine and the contract's methods over it (Ray calls them by name)."""

    # Ray Serve awaits an async constructor (mypy insists constructors return None).
    async def __init__(self, engine: Mapping[str, Any] | None = None) -> None:  # type: ignore[misc]
        self._replica = serve.get_replica_context().replica_id.unique_id
        config = engine_config(engine)
        self._engine = await asyncio.to_thread(Engine, config)
        await self._engine.start()
        self._draining = False
        self._servicer = GenerationServicer(self._current_engine)
        self._metrics = ReplicaMetrics()
        self._metrics.start_sampling(self._engine)
        interceptor = ErrorMappingInterceptor(f"/{SERVICE_NAME}/", self._metrics)
        self._unary: dict[str, _Behavior] = {}
        self._streams: dict[str, _Behavior] = {}
        for name, behavior in (
            ("Generate", self._generate),
            ("Tokenize", self._servicer.Tokenize),
            ("GetModelInfo", self._servicer.GetModelInfo),
            ("ListAdapters", self._servicer.ListAdapters),
            ("LoadAdapter", self._load_adapter),
        ):
            self._unary[name] = await _mapped(
                interceptor, name, grpc.unary_unary_rpc_method_handler(behavior)
            )
        self._streams["StreamGenerate"] = await _mapped(
            interceptor, "StreamGenerate", grpc.unary_stream_rpc_method_handler(self._stream)
        )
        loop = asyncio.get_running_loop()

        def on_event(event: AdapterEvent) -> None:
            # The registry calls listeners on the thread making the change.
            loop.call_soon_threadsafe(self._on_adapter_event, event)

        self._unsubscribe = self._engine.subscribe_adapters(on_event)
        logger.info(
            "replica %s serving %s on %s",
            self._replica,
            config.model_path,
            self._engine.info.device,
        )

    def _current_engine(self) -> Engine:
        return self._engine

    # ---- the contract's methods, called by Ray's proxy by name ----
    async def Generate(  # noqa: N802 - the RPC's name is the method's
        self, request: pb.GenerateRequest, grpc_context: Any
    ) -> pb.GenerateResponse:
        return await self._call_unary("Generate", request, grpc_context, pb.GenerateResponse)

    async def StreamGenerate(  # noqa: N802
        self, request: pb.GenerateRequest, grpc_context: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        context = ReplicaCallContext(grpc_context)
        try:
            async for message in self._streams["StreamGenerate"](request, context):
                yield message
        except grpc.aio.AbortError:
            # The status is on Ray's context; an empty message carries it to the proxy,
            # whose hook drops the message itself (proxy.py).
            yield pb.StreamGenerateResponse()

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, grpc_context: Any
    ) -> pb.TokenizeResponse:
        return await self._call_unary("Tokenize", request, grpc_context, pb.TokenizeResponse)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, grpc_context: Any
    ) -> pb.GetModelInfoResponse:
        return await self._call_unary(
            "GetModelInfo", request, grpc_context, pb.GetModelInfoResponse
        )

    async def ListAdapters(  # noqa: N802
        self, request: pb.ListAdaptersRequest, grpc_context: Any
    ) -> pb.ListAdaptersResponse:
        return await self._call_unary(
            "ListAdapters", request, grpc_context, pb.ListAdaptersResponse
        )

    async def LoadAdapter(  # noqa: N802
        self, request: pb.LoadAdapterRequest, grpc_context: Any
    ) -> pb.LoadAdapterResponse:
        return await self._call_unary("LoadAdapter", request, grpc_context, pb.LoadAdapterResponse)

    async def UnloadAdapter(  # noqa: N802
        self, request: pb.UnloadAdapterRequest, grpc_context: Any
    ) -> pb.UnloadAdapterResponse:
        ReplicaCallContext(grpc_context).set_status(
            _unimplemented(
                "UnloadAdapter",
                "an adapter is a directory of the shared adapters root, loaded on demand by "
                "each replica: remove the directory (replicas evict idle copies as others "
                "need room) or redeploy",
            )
        )
        return pb.UnloadAdapterResponse()

    async def WatchAdapters(  # noqa: N802
        self, request: pb.WatchAdaptersRequest, grpc_context: Any
    ) -> AsyncIterator[pb.WatchAdaptersResponse]:
        ReplicaCallContext(grpc_context).set_status(
            _unimplemented(
                "WatchAdapters",
                "each replica holds its own subset of adapters, and an endless watch would "
                "count as an ongoing request for autoscaling; use ListAdapters on the replicas "
                "or Ray's serve_num_multiplexed_models metric",
            )
        )
        yield pb.WatchAdaptersResponse()

    # grpc.health.v1.Health, so standard probes work through the proxy.
    async def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            ReplicaCallContext(grpc_context).set_error(
                grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"
            )
            return health_pb2.HealthCheckResponse()
        serving = not self._draining
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    # ---- for operators, through a DeploymentHandle (not on the gRPC proxy) ----
    def engine_stats(self) -> dict[str, Any]:
        """This replica's load and adapters. ``handle.options(method_name="engine_stats",
        multiplexed_model_id=NAME)`` asks a replica holding adapter NAME."""
        stats = self._engine.stats()
        return {
            "replica": self._replica,
            "queued": stats.queued,
            "running": stats.running,
            "running_rows": stats.running_rows,
            "adapters": sorted(a.name for a in self._engine.adapters()),
            # What this replica reports to Ray's router: never an adapter it no longer holds.
            "routed_adapters": sorted(getattr(self, _MULTIPLEX_ATTRIBUTE).models)
            if hasattr(self, _MULTIPLEX_ATTRIBUTE)
            else [],
        }

    # ---- Ray's hooks ----
    async def __del__(self) -> None:
        """Ray already waited for the ongoing requests; end the engine's leftovers."""
        self._draining = True
        self._unsubscribe()
        await self._metrics.stop()
        await self._engine.drain(1.0)
        await self._engine.stop()

    # ---- behaviours behind the error-mapping interceptor ----
    async def _call_unary(
        self, name: str, request: Any, grpc_context: Any, empty: Callable[[], Any]
    ) -> Any:
        context = ReplicaCallContext(grpc_context)
        try:
            return await self._unary[name](request, context)
        except grpc.aio.AbortError:
            return empty()  # the status is on Ray's context; the proxy sends it

    async def _generate(
        self, request: pb.GenerateRequest, context: ReplicaCallContext
    ) -> pb.GenerateResponse:
        await self._route(request.adapter, context)
        response = await self._servicer.Generate(request, context)
        response.provenance.replica = self._replica
        return response

    async def _stream(
        self, request: pb.GenerateRequest, context: ReplicaCallContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        await self._route(request.adapter, context)
        async for message in self._servicer.StreamGenerate(request, context):
            if message.HasField("summary"):
                message.summary.provenance.replica = self._replica
            yield message

    async def _load_adapter(
        self, request: pb.LoadAdapterRequest, context: ReplicaCallContext
    ) -> pb.LoadAdapterResponse:
        if request.path and request.path != request.name:
            raise InvalidRequestError.single(
                "path",
                "on Ray Serve an adapter is served under its directory name in the shared "
                "adapters root, so every replica can load it; leave path empty or equal to name",
            )
        if request.pinned:
            raise InvalidRequestError.single(
                "pinned",
                "pins are per replica; list the adapter in the deployment's "
                "engine.pinned_adapters to pin it on every replica",
            )
        self._check_routing(request.name, "name")
        response = await self._servicer.LoadAdapter(request, context)
        await self._hold(request.name)
        return response

    def _check_routing(self, adapter: str, field: str) -> None:
        routed = serve.get_multiplexed_model_id()
        if routed and routed != adapter:
            raise InvalidRequestError.single(
                field,
                f"the multiplexed_model_id metadata routes to {routed!r} but the request "
                f"names {adapter!r}; send the same adapter in both",
            )

    async def _route(self, adapter: str, context: ReplicaCallContext) -> None:
        """Check the routing metadata, load the adapter here if needed, report it to Ray."""
        self._check_routing(adapter, "adapter")
        if not adapter:
            return
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        await self._engine.await_adapter(adapter, deadline)
        status = self._engine.registry.entry(adapter)
        if status is not None and status.state is AdapterState.READY:
            await self._hold(adapter)

    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _hold(self, adapter: str) -> str:
        """Tell Ray's router this replica holds ``adapter``. The engine already loaded it; the
        bound and the eviction are the engine's (an evicted adapter is forgotten below)."""
        return adapter

    def _on_adapter_event(self, event: AdapterEvent) -> None:
        if event.kind is not AdapterEventKind.REMOVED:
            return
        wrapper = getattr(self, _MULTIPLEX_ATTRIBUTE, None)
        if wrapper is not None and wrapper.models.pop(event.status.name, None) is not None:
            # Ray's wrapper pushes its model ids to the router when this flag is set.
            wrapper._push_multiplexed_replica_info = True


async def _mapped(
    interceptor: ErrorMappingInterceptor, name: str, handler: grpc.RpcMethodHandler
) -> _Behavior:
    """``handler``'s behaviour as the plain server's interceptor wraps it."""

    async def continuation(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handler

    details = _CallDetails(f"/{SERVICE_NAME}/{name}", ())
    wrapped = await interceptor.intercept_service(continuation, details)
    behavior = wrapped.unary_unary or wrapped.unary_stream
    assert behavior is not None
    return behavior


def _unimplemented(method: str, why: str) -> grpc.Status:
    return reason_status(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} is not available on a Ray Serve deployment: {why}",
        "NOT_AVAILABLE_ON_RAY_SERVE",
    )
