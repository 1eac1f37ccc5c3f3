"""Channel construction shared by the sync and asyncio clients: TLS, auth, limits, balancing.

Both twins call ``channel_options`` and ``channel_credentials`` so a setting can never differ
between them; only the final ``grpc.*_channel`` vs ``grpc.aio.*_channel`` call differs.

Balancing and retries are gRPC's own, configured by one service config (``service_config``):
the target's resolver (``dns:///host:port`` resolves every address of a headless Service;
``ipv4:a:p1,b:p2`` lists them) feeds the ``round_robin`` policy, which opens a subchannel per
address, watches each one's ``grpc.health.v1`` status for GenerationService and picks only
SERVING ones; the retry policy re-sends calls that failed before any response. docs/deploy.md
gives the same JSON for clients in other languages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "SERVICE_NAME",
    "ChannelSettings",
    "TLSOptions",
    "auth_metadata",
    "create_aio_channel",
    "create_channel",
    "retry_service_config",
    "service_config",
]

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE_NAME = "peftserve.v1.GenerationService"
# Responses with many sequences, token ids and top logprobs outgrow gRPC's 4 MiB default.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

ChannelOption = tuple[str, Any]


@dataclass(frozen=True)
class TLSOptions:
    """TLS material, PEM-encoded. All None: TLS with the system's root certificates.

    Set ``private_key`` and ``certificate_chain`` together for mutual TLS.
    """

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    # Overrides the name the server certificate is checked against (tests, IP targets).
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain")

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        server_name_override: str | None = None,
    ) -> TLSOptions:
        """Read the PEM files; a None path leaves that part unset."""

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(
            read(root_certificates),
            read(private_key),
            read(certificate_chain),
            server_name_override,
        )


@dataclass(frozen=True)
class ChannelSettings:
    """Everything about the connection except the target; the defaults suit a local server."""

    tls: TLSOptions | None = None
    # Bearer token sent as ``authorization: Bearer <token>`` on every call.
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # gRPC servers refuse pings more frequent than 5 minutes by default
    # (GOAWAY "too_many_pings"), so the client does not ping more often unless told to.
    keepalive_time_s: float = 300.0
    keepalive_timeout_s: float = 20.0
    # Longest wait between reconnection attempts to an address that refused (gRPC's default
    # is 120 s): a replica restarted in place (same address) is back in the rotation within
    # this long of being ready.
    reconnect_backoff_max_s: float = 10.0
    # Transparent retries of UNAVAILABLE and RESOURCE_EXHAUSTED (see service_config).
    retries: bool = True
    max_attempts: int = 4
    # Spread calls over every resolved address, skipping those whose health is not SERVING
    # (see service_config); False leaves gRPC's default, pick_first (one connection).
    balance: bool = True
    # Extra raw channel arguments, appended last so they win.
    extra_options: tuple[ChannelOption, ...] = ()


# Retry backoff: attempt n waits a random time in [0, min(initial * multiplier^(n-1), max)].
RETRY_INITIAL_BACKOFF = "0.2s"
RETRY_MAX_BACKOFF = "5s"
RETRY_BACKOFF_MULTIPLIER = 2
RETRYABLE_STATUS_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


def service_config(
    *, max_attempts: int = 4, retries: bool = True, balance: bool = True
) -> dict[str, Any]:
    """The gRPC service config for GenerationService, as a dict (``json.dumps`` it).

    - ``loadBalancingConfig: round_robin`` spreads calls over every resolved address instead
      of pinning them to the first; ``healthCheckConfig`` makes each subchannel watch the
      server's ``grpc.health.v1`` status for GenerationService, so a replica that is loading or
      draining (NOT_SERVING) gets no new calls while its in-flight ones finish.
    - ``retryPolicy`` re-sends a call that failed with UNAVAILABLE (loading, draining,
      connection lost) or RESOURCE_EXHAUSTED (queue full) before any response message arrived,
      to whichever replica round_robin picks next: at most ``max_attempts`` attempts in all,
      with exponential backoff (0.2 s, 0.4 s, ... capped at 5 s, randomised). Generation has
      no side effects, so a retry is safe; a stream that delivered a message is never retried.
    """
    config: dict[str, Any] = {}
    if balance:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
    if retries:
        if not 1 <= max_attempts <= 5:
            raise ValueError("max_attempts must be in [1, 5] (gRPC's own cap is 5)")
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": RETRY_INITIAL_BACKOFF,
                    "maxBackoff": RETRY_MAX_BACKOFF,
                    "backoffMultiplier": RETRY_BACKOFF_MULTIPLIER,
                    "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
                },
            }
        ]
    return config


def retry_service_config(max_attempts: int = 4) -> str:
    """The service config JSON with retries only (no balancing): see ``service_config``."""
    return json.dumps(service_config(max_attempts=max_attempts, balance=False))


def channel_options(settings: ChannelSettings) -> list[ChannelOption]:
    """The raw channel arguments for ``settings``."""
    options: list[ChannelOption] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        # Pinging an idle connection would only provoke the server's ping policy.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_reconnect_backoff_ms", int(settings.reconnect_backoff_max_s * 1000)),
        ("grpc.enable_retries", 1 if settings.retries else 0),
    ]
    config = service_config(
        max_attempts=settings.max_attempts, retries=settings.retries, balance=settings.balance
    )
    if config:
        options.append(("grpc.service_config", json.dumps(config)))
    if settings.tls is not None and settings.tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", settings.tls.server_name_override))
    options.extend(settings.extra_options)
    return options


def channel_credentials(settings: ChannelSettings) -> grpc.ChannelCredentials | None:
    """Credentials for a secure channel, or None for plaintext."""
    if settings.tls is None:
        return None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.tls.root_certificates,
        private_key=settings.tls.private_key,
        certificate_chain=settings.tls.certificate_chain,
    )
    if settings.token:
        # With TLS the token rides on call credentials, which gRPC only sends over a
        # secure transport; that is exactly the guarantee we want for a secret.
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(settings.token)
        )
    return credentials


def auth_metadata(settings: ChannelSettings) -> tuple[tuple[str, str], ...]:
    """Per-call metadata for the token on a plaintext channel (call credentials need TLS)."""
    if settings.token and settings.tls is None:
        return (("authorization", f"Bearer {settings.token}"),)
    return ()


def create_channel(target: str, settings: ChannelSettings | None = None) -> grpc.Channel:
    """A sync channel to ``target``: "host:port", "dns:///host:port", "ipv4:a:p,b:p", ..."""
    settings = settings or ChannelSettings()
    credentials = channel_credentials(settings)
    options: Sequence[ChannelOption] = channel_options(settings)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def create_aio_channel(target: str, settings: ChannelSettings | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (as for ``create_channel``); create it inside the
    running loop."""
    settings = settings or ChannelSettings()
    credentials = channel_credentials(settings)
    options: Sequence[ChannelOption] = channel_options(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
