"""Optional bearer-token auth: a server interceptor that runs before every other one.

Callers send ``authorization: Bearer <token>`` metadata (the client's ``token=`` does). Missing
or malformed metadata is UNAUTHENTICATED, a well-formed token that is not configured is
PERMISSION_DENIED; both carry ``ErrorInfo`` like every other peftserve error. Health and
reflection stay open so that probes and tooling work without a secret.

Tokens come from ``--auth-tokens-file`` (one per line; blank and ``#`` lines ignored) and/or
``PEFTSERVE_AUTH_TOKENS`` (comma-separated), read once at startup. Never from a flag: the
command line of a process is visible to every local user.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from .errors import reason_status
from .logs import RateLimit

__all__ = [
    "AUTH_TOKENS_ENV",
    "AuthenticationError",
    "BearerTokenInterceptor",
    "PermissionDeniedError",
    "load_tokens",
    "parse_token_list",
    "read_tokens_file",
    "token_problem",
]

AUTH_TOKENS_ENV = "PEFTSERVE_AUTH_TOKENS"
# gRPC metadata values are visible ASCII; a token with spaces could never be sent as one.
_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")
# Shorter tokens are accepted (tests, local use) but are guessable; the log says so.
_RECOMMENDED_MIN_TOKEN_CHARS = 32

# Rejections share the per-request log line's logger and shape (see interceptor.py).
request_logger = logging.getLogger("peftserve.requests")
logger = logging.getLogger("peftserve.auth")
# A flood of bad tokens must not become a flood of log lines: at most this many rejection
# lines a second; the next line written says how many were held back.
REJECTION_LINES = RateLimit(burst=20, interval_s=1.0)


class AuthenticationError(Exception):
    """No usable credentials: metadata missing, repeated or not ``Bearer <token>``."""

    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
    reason: str = "AUTH_TOKEN_MISSING"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def status(self) -> grpc.Status:
        """The rich status this rejection is sent as (never mentions the token itself)."""
        return reason_status(self.code, self.message, self.reason)


class PermissionDeniedError(AuthenticationError):
    """A well-formed bearer token that is not one of the configured tokens."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "AUTH_TOKEN_REJECTED"


def parse_token_list(value: str) -> tuple[str, ...]:
    """Tokens from ``PEFTSERVE_AUTH_TOKENS``: comma-separated, surrounding spaces ignored."""
    return tuple(t.strip() for t in value.split(",") if t.strip())


def read_tokens_file(path: Path) -> tuple[str, ...]:
    """Tokens from a file: one per line; blank lines and ``#`` comments are ignored."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be used (without echoing it), or None."""
    if not _TOKEN_PATTERN.fullmatch(token):
        return "a token contains whitespace or non-ASCII characters"
    return None


def load_tokens(tokens_file: Path | None, tokens: Sequence[str]) -> tuple[str, ...]:
    """Every configured token: the file's plus the environment's, duplicates dropped."""
    from_file = read_tokens_file(tokens_file) if tokens_file is not None else ()
    return tuple(dict.fromkeys((*from_file, *tokens)))


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking a token's length.
    return hashlib.sha256(token.encode("utf-8")).digest()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a configured bearer token, except to the public services."""

    def __init__(self, tokens: Iterable[str], public_services: Iterable[str]) -> None:
        tokens = tuple(tokens)
        self._digests = tuple(_digest(t) for t in tokens)
        if not self._digests:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._public_prefixes = tuple(f"/{name}/" for name in public_services)
        short = sum(1 for t in tokens if len(t) < _RECOMMENDED_MIN_TOKEN_CHARS)
        if short:
            logger.warning(
                "%d auth token(s) shorter than %d characters; use long random tokens",
                short,
                _RECOMMENDED_MIN_TOKEN_CHARS,
            )

    def _accepts(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        # No early exit: the time taken does not depend on which token (if any) matched.
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched

    def check(self, metadata: Sequence[tuple[str, Any]] | None) -> AuthenticationError | None:
        """The rejection for a call with this invocation metadata, or None to admit it."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            return AuthenticationError(
                "missing credentials: send 'authorization: Bearer <token>' metadata"
            )
        if len(values) > 1:
            return AuthenticationError("send exactly one 'authorization' metadata entry")
        value = values[0]
        scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
        # RFC 7235: the scheme is case-insensitive; the token is one run of visible ASCII.
        if scheme.lower() != "bearer" or not _TOKEN_PATTERN.fullmatch(token):
            return AuthenticationError("the 'authorization' metadata must be 'Bearer <token>'")
        if not self._accepts(token):
            return PermissionDeniedError("the bearer token is not accepted by this server")
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self._public_prefixes):
            return await continuation(handler_call_details)
        rejection = self.check(handler_call_details.invocation_metadata)
        # The handler is looked up (not run) even for a rejection: the rejecting handler must
        # have the same cardinality, and an unknown method stays UNIMPLEMENTED.
        handler = await continuation(handler_call_details)
        if rejection is None or handler is None:
            return handler
        return _rejecting_handler(handler, method, rejection)


def _rejecting_handler(
    handler: grpc.RpcMethodHandler, method: str, rejection: AuthenticationError
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that aborts with ``rejection`` and runs nothing else."""
    status = rejection.status()

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        suppressed = REJECTION_LINES.allow()
        if suppressed is not None:
            extra: dict[str, object] = {
                "rpc": method.rsplit("/", 1)[-1],
                "status": rejection.code.name,
                "reason": rejection.reason,
                "peer": context.peer(),
            }
            if suppressed:
                extra["suppressed"] = suppressed
            request_logger.info("request", extra=extra)
        await context.abort_with_status(status)

    # No request deserializer: an unauthenticated caller's bytes are never parsed.
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.stream_stream_rpc_method_handler(abort)
