"""Build and run the grpc.aio server: service, health, reflection, loading and graceful stop.

Lifecycle: the port opens at once with health NOT_SERVING while the model loads in a worker
thread (generation calls get UNAVAILABLE); SERVING when ready; on drain, NOT_SERVING again,
new requests get UNAVAILABLE, and in-flight ones get ``shutdown_grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from peftserve.v1 import generation_pb2, generation_pb2_grpc

from .admin import ADMIN_METHOD_NAMES, MethodScopedTokenInterceptor
from .auth import BearerTokenInterceptor, load_tokens
from .config import ServerConfig, validate_security
from .engine.engine import Engine
from .engine.errors import EngineUnavailableError
from .engine_proc import AnyEngine, EngineProxy
from .interceptor import ErrorMappingInterceptor, RequestObserver
from .logs import install_grpc_log_filter

if TYPE_CHECKING:
    from .metrics import ServerMetrics
from .servicer import GenerationServicer

logger = logging.getLogger("peftserve.server")

SERVICE_NAME: str = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


class PeftServeServer:
    """The running service: a grpc.aio server plus the engine it serves."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._engine: AnyEngine | None = None
        # loading -> serving -> draining -> stopped | failed; serving -> lost (engine process
        # died: the server must exit, see wait_engine_lost)
        self._state = "loading"
        self._lost = asyncio.Event()
        self._lost_message = ""
        self._load_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None
        problems = validate_security(config)
        if problems:
            raise ValueError("; ".join(problems))
        install_grpc_log_filter()
        self.health = health.aio.HealthServicer()
        self.metrics: ServerMetrics | None = None
        if config.metrics_address:
            # Imported only when asked for: prometheus-client is needed for metrics alone.
            from .metrics import ServerMetrics

            # The engine is read through a lambda: it exists only once loading has finished.
            self.metrics = ServerMetrics(lambda: self._engine)
        self.metrics_port: int | None = None
        self.grpc_server = grpc.aio.server(
            interceptors=_interceptors(config, self.metrics), options=_channel_options(config)
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.engine), self.grpc_server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        credentials = _server_credentials(config)
        if credentials is None:
            self.port = self.grpc_server.add_insecure_port(config.address)
        else:
            self.port = self.grpc_server.add_secure_port(config.address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {config.address}")

    @property
    def state(self) -> str:
        return self._state

    def engine(self) -> AnyEngine:
        """The engine, if requests are admitted now; else EngineUnavailableError."""
        if self._state == "lost":
            raise EngineUnavailableError(self._lost_message)
        if self._state == "loading":
            raise EngineUnavailableError("the model is still loading; retry shortly")
        if self._state == "failed":
            raise EngineUnavailableError("the model failed to load; see the server log")
        if self._state in ("draining", "stopped") or self._engine is None:
            raise EngineUnavailableError("the server is shutting down")
        return self._engine

    async def start(self) -> None:
        """Open the port now and load the model in the background."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if self.metrics is not None:
            self.metrics_port = self.metrics.start(self.config.metrics_address)
        logger.info("listening on port %d; loading the model", self.port)
        self._load_task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        engine: AnyEngine
        try:
            if self.config.engine_process:
                engine = await EngineProxy.launch(
                    self.config.engine,
                    self.config.log_level,
                    self.config.log_format,
                    on_exit=self._engine_exited,
                )
            else:
                engine = await asyncio.to_thread(Engine, self.config.engine)
                await engine.start()
        except Exception:
            logger.exception("failed to load the model from %s", self.config.engine.model_path)
            self._state = "failed"
            self._ready.set()
            return
        self._engine = engine
        if self.metrics is not None:
            self.metrics.engine_ready(engine)
        if self._state == "loading":
            self._state = "serving"
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            info = engine.info
            logger.info(
                "serving %s on %s (%s) with adapters: %s",
                info.model_id,
                info.device,
                info.dtype,
                ", ".join(a.name for a in engine.adapters()) or "none",
            )
        self._ready.set()

    def _engine_exited(self, code: int) -> None:
        """The engine process died: refuse everything, report NOT_SERVING, let the process
        exit non-zero (``wait_engine_lost``) so that a supervisor restarts it."""
        self._lost_message = f"the engine process exited with code {code}"
        if self._state in ("draining", "stopped"):
            return
        logger.error("%s; the server cannot serve any more and will exit", self._lost_message)
        self._state = "lost"
        self._lost.set()
        task = asyncio.create_task(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self._health_task = task

    async def wait_engine_lost(self) -> str:
        """Return (with the reason) once the engine process has died while serving."""
        await self._lost.wait()
        return self._lost_message

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until loading has finished; raises RuntimeError if it failed."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        if self._state == "failed":
            raise RuntimeError("the model failed to load")

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new work, let in-flight requests finish within the grace, then stop."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._state == "stopped":
            return
        previous = self._state
        self._state = "draining"
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("draining: up to %.1fs for in-flight requests", grace)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._engine is not None and previous == "serving":
            await self._engine.drain(grace)
        # In-flight RPCs have their results by now; a short grace lets responses flush.
        await self.grpc_server.stop(min(grace, 1.0))
        if self._engine is not None:
            await self._engine.stop()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        self._state = "stopped"
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def _set_health(self, status: Any) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)


def _interceptors(
    config: ServerConfig, observer: RequestObserver | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """Auth first (when tokens are configured), so a rejected call reaches nothing else.

    With admin tokens, LoadAdapter/UnloadAdapter are checked against those only, and every other
    method against the caller tokens only (see admin.py).
    """
    interceptors: list[grpc.aio.ServerInterceptor] = []
    public = (health.SERVICE_NAME, reflection.SERVICE_NAME)
    tokens = load_tokens(config.auth_tokens_file, config.auth_tokens)
    admin_tokens = load_tokens(config.admin_tokens_file, config.admin_tokens)
    if tokens and admin_tokens:
        interceptors.append(
            MethodScopedTokenInterceptor(tokens, public, SERVICE_NAME, skip=ADMIN_METHOD_NAMES)
        )
    elif tokens:
        interceptors.append(BearerTokenInterceptor(tokens, public))
    if admin_tokens:
        interceptors.append(
            MethodScopedTokenInterceptor(admin_tokens, (), SERVICE_NAME, only=ADMIN_METHOD_NAMES)
        )
    plaintext = config.tls_cert_file is None and not _is_loopback(config.address)
    if (tokens or admin_tokens) and plaintext:
        logger.warning("bearer tokens are enabled without TLS: they cross the network in clear")
    interceptors.append(
        ErrorMappingInterceptor(f"/{SERVICE_NAME}/", observer, config.stream_stall_timeout_s)
    )
    return interceptors


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS) credentials, or None for plaintext; files were validated."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    client_ca = config.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=config.tls_require_client_auth,
    )


# Streams a connection may open beyond what the engine admits (see _channel_options).
_STREAM_HEADROOM = 16


def max_concurrent_streams(config: ServerConfig) -> int:
    """The HTTP/2 stream limit per connection: the flag, raised to what the engine admits."""
    engine = config.engine
    return max(
        config.max_concurrent_streams,
        engine.max_batch_size + engine.max_queue_size + _STREAM_HEADROOM,
    )


def _channel_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """HTTP/2 and keepalive settings; SECURITY.md explains each choice."""
    return _security_options(config) + _connection_age_options(config)


def _connection_age_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """GOAWAY after --max-connection-age-s (docs/deploy.md: autoscaling). No age grace is set,
    so a call in flight on an aged connection is never cut; only new calls move."""
    if config.max_connection_age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000))]


def _security_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        # Calls beyond what the engine admits (running + queued) must reach the engine, which
        # answers RESOURCE_EXHAUSTED with RetryInfo; a tight HTTP/2 cap would instead refuse the
        # streams (RST_STREAM REFUSED_STREAM -> UNAVAILABLE, no retry hint), as a 150-call burst
        # showed. The cap only bounds per-connection memory.
        (
            "grpc.max_concurrent_streams",
            max_concurrent_streams(config),
        ),
        # The server pings idle peers to find dead connections and free their streams.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Ping abuse policy: clients may ping at most every 10 s without data; a third
        # too-early ping (strikes counted from 0) ends the connection with GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Linux SO_REUSEPORT would let another local process bind our port and take a share
        # of the connections (and the tokens sent on them).
        ("grpc.so_reuseport", 0),
    ]


async def create_server(config: ServerConfig) -> tuple[PeftServeServer, int]:
    """Create and start the server; returns it with the bound port (address port 0 = any)."""
    server = PeftServeServer(config)
    await server.start()
    return server, server.port
