"""What peftserve adds to Ray Serve's gRPC proxy: the services, deadlines, and stream statuses.

Ray's gRPC proxy calls the functions named in ``grpc_options.grpc_servicer_functions`` with its
server, then routes each method of the services they register to the deployment method of the
same name. Two gaps of the proxy (Ray 2.60) are closed here, in the proxy process:

- It does not forward the caller's deadline. Each call gets the time the caller has left as
  ``peftserve-timeout-ms`` metadata, so the replica's engine sees the deadline (queue
  admission, DEADLINE_EXCEEDED, the finish reason) as a plain server's does.
- It copies a replica's status and trailers (``grpc-status-details-bin``) onto the call only
  with a response message. A unary replica method returns an empty message with its status; a
  streaming one ends with a zero-length "status carrier" message, which is dropped here, so
  the caller sees the status with its ``google.rpc`` details and no stray message. An empty
  message is never a valid stream message of the contract (exactly one event is set).
- It reports a replica that died mid-call as INTERNAL, with the actor's pid and address in the
  message; that becomes UNAVAILABLE with a plain message, so retry policies resend the call.

``grpc.health.v1.Health/Watch`` is answered here, by the proxy, rather than routed: gRPC
clients with health checking in their service config (peftserve's do) hold one Watch stream per
connection for as long as the channel lives, and on a replica each would count as an ongoing
request for autoscaling forever. The proxy reports SERVING while it runs (Ray routes only to
replicas whose engine has loaded); ``Check`` goes to a replica.

All of this rides on ``gRPCGenericServer.service_handler_factory`` (how the proxy builds its
per-method handlers); without it (another Ray version) the services still register unchanged
and only these refinements are missing, which is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from peftserve.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger("peftserve.ray")

# Milliseconds the caller still had when the proxy received the call; read by the replica.
TIMEOUT_METADATA_KEY = "peftserve-timeout-ms"


class _DeadlineForwardingContext:
    """The proxy's view of a call, plus the caller's remaining time as metadata.

    A caller may send a shorter ``peftserve-timeout-ms`` itself (the engine then ends its
    request early, with finish reason DEADLINE_EXCEEDED, while the call stays open); a longer
    or malformed one is replaced by the real deadline's.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        metadata = []
        limits_ms: list[int] = []
        for key, value in context.invocation_metadata():
            if key != TIMEOUT_METADATA_KEY:
                metadata.append((key, value))
            elif isinstance(value, str) and value.isdigit():
                limits_ms.append(int(value))
        remaining = context.time_remaining()
        if remaining is not None:
            limits_ms.append(max(0, int(remaining * 1000)))
        if limits_ms:
            metadata.append((TIMEOUT_METADATA_KEY, str(min(limits_ms))))
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def __getattr__(self, name: str) -> Any:
        # Everything else (peer, auth context, codes, trailers) is the real call's.
        return getattr(self._context, name)


# How Ray 2.60 words a replica actor that died or became unreachable mid-call (RayActorError).
_REPLICA_LOST_PREFIX = "The actor "
REPLICA_LOST_MESSAGE = "the replica serving this call stopped; retry (another replica will take it)"


def _replica_lost_is_unavailable(context: Any) -> None:
    """Ray reports a replica that died mid-call as INTERNAL with its actor's pid and address;
    it is UNAVAILABLE (gRPC retry policies resend those) and the caller learns nothing else."""
    code = context.code()
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL.value[0]) and str(
        context.details() or ""
    ).startswith(_REPLICA_LOST_PREFIX):
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(REPLICA_LOST_MESSAGE)


def _unary(handler: Callable[..., Any]) -> Callable[..., Any]:
    async def unary(request: Any, context: Any) -> Any:
        response = await handler(request, _DeadlineForwardingContext(context))
        _replica_lost_is_unavailable(context)
        return response

    return unary


def _server_stream(handler: Callable[..., AsyncIterator[bytes]]) -> Callable[..., Any]:
    async def server_stream(request: Any, context: Any) -> AsyncIterator[bytes]:
        async for message in handler(request, _DeadlineForwardingContext(context)):
            if message:  # b"": the replica's status carrier, already applied to the call
                yield message
        _replica_lost_is_unavailable(context)

    return server_stream


_SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


async def _watch_health(request: Any, context: Any) -> AsyncIterator[bytes]:
    """Health/Watch on the proxy: SERVING (or SERVICE_UNKNOWN) once, then held open."""
    known = request.service in ("", _SERVICE_NAME)
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if known
        else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    )
    yield health_pb2.HealthCheckResponse(status=status).SerializeToString()
    await asyncio.Event().wait()  # until the caller goes away or the proxy stops


def _refine(
    server: Any,
    add_service: Callable[[Any, Any], None],
    servicer: Any,
    local: Mapping[str, Callable[..., Any]] | None = None,
) -> None:
    """Register a service whose methods Ray routes to replicas, with the refinements above;
    methods in ``local`` (server streams) are answered by the proxy itself."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        logger.warning(
            "this Ray version's gRPC proxy has no service_handler_factory: deadlines are not "
            "forwarded and streams lose their google.rpc error details"
        )
        add_service(servicer, server)
        return

    def refined_factory(service_method: str, streaming_type: Any) -> Callable[..., Any]:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        kind = getattr(streaming_type, "value", streaming_type)
        if kind == "unary_unary":
            return _unary(handler)
        if kind == "unary_stream":
            if local and service_method in local:
                return local[service_method]
            return _server_stream(handler)
        return handler  # the contract has no client or bidi streams

    server.service_handler_factory = refined_factory
    try:
        add_service(servicer, server)
    finally:
        server.service_handler_factory = factory


def add_generation_service(servicer: Any, server: grpc.aio.Server) -> None:
    """``peftserve.v1.GenerationService`` on Ray's gRPC proxy (a grpc_servicer_functions entry)."""
    _refine(server, generation_pb2_grpc.add_GenerationServiceServicer_to_server, servicer)


def add_health_service(servicer: Any, server: grpc.aio.Server) -> None:
    """``grpc.health.v1.Health`` on Ray's gRPC proxy: Check by a replica, Watch by the proxy."""
    _refine(
        server,
        health_pb2_grpc.add_HealthServicer_to_server,
        servicer,
        local={f"/{health.SERVICE_NAME}/Watch": _watch_health},
    )


# The Serve config's grpc_servicer_functions, in this order.
SERVICER_FUNCTIONS: tuple[str, ...] = (
    f"{__name__}.add_generation_service",
    f"{__name__}.add_health_service",
)
