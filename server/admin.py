"""Admin tokens: LoadAdapter and UnloadAdapter need a token of their own when configured.

Changing what the server serves is a different privilege from calling it, so admin tokens are
a separate list (``--admin-tokens-file`` / ``PEFTSERVE_ADMIN_TOKENS``, never a flag value) and
the two checks are scoped by method: with admin tokens configured, admin methods accept only
admin tokens and caller tokens are not checked for them; every other method is unaffected.
Without admin tokens, the admin methods follow the caller auth like every other RPC.
The checks themselves are ``auth.BearerTokenInterceptor``'s (same metadata, same statuses).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import grpc

from .auth import BearerTokenInterceptor

__all__ = ["ADMIN_METHOD_NAMES", "ADMIN_TOKENS_ENV", "MethodScopedTokenInterceptor"]

ADMIN_TOKENS_ENV = "PEFTSERVE_ADMIN_TOKENS"
# Short method names of GenerationService that change the served adapters.
ADMIN_METHOD_NAMES: frozenset[str] = frozenset({"LoadAdapter", "UnloadAdapter"})


class MethodScopedTokenInterceptor(BearerTokenInterceptor):
    """A ``BearerTokenInterceptor`` that checks only some methods of one service.

    ``only`` given: check just those methods (the admin check). ``skip`` given: check all but
    those (the caller check, which must not reject an admin call carrying an admin token).
    """

    def __init__(
        self,
        tokens: Iterable[str],
        public_services: Iterable[str],
        service: str,
        *,
        only: Iterable[str] | None = None,
        skip: Iterable[str] = (),
    ) -> None:
        super().__init__(tokens, public_services)
        self._only = None if only is None else {f"/{service}/{m}" for m in only}
        self._skip = {f"/{service}/{m}" for m in skip}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        out_of_scope = method in self._skip or (self._only is not None and method not in self._only)
        if out_of_scope:
            return await continuation(handler_call_details)
        return await super().intercept_service(continuation, handler_call_details)
