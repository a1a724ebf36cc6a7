"""Bearer-token authentication for both protocols (``--auth_token_file``).

One ``TokenAuth`` holds the accepted tokens and decides which endpoints stay
open. REST sends ``Authorization: Bearer <token>``; gRPC sends the same value in
the ``authorization`` metadata entry (what ``grpc.access_token_call_credentials``
and most gRPC clients send). A missing or wrong token is ``Unauthenticated``:
HTTP 401 through the REST adapter's one error handler, ``UNAUTHENTICATED``
through :class:`AuthInterceptor`.

Health endpoints (REST ``/healthz``, ``/readyz``, ``/v2/health/*``; gRPC
``grpc.health.v1`` and V2 ``ServerLive``/``ServerReady``) are always open,
because kubelet probes carry no token.
Metrics endpoints are open unless ``protect_metrics`` (``--auth_metrics``).
Everything else, model status, metadata, the model list, the OpenAPI document
and gRPC reflection included, needs the token.

Tokens are compared with ``hmac.compare_digest`` against every accepted token,
so neither a token's content nor which token matched shows in the timing. The
token file may hold several tokens, one per line, so a token can be rotated
without a window in which clients are refused: add the new one, restart,
move clients, remove the old one, restart.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from graft.tokens import MIN_TOKEN_CHARS, parse_tokens, read_token_file  # noqa: F401 (this module's API)
from serving.errors import Unauthenticated
from serving.grpc.status import abort
from serving.metrics import DEFAULT_METRICS_PATHS

# REST paths answered without a token (exact matches: routing is exact too, so a
# path that merely starts like one of these still needs the token).
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
# gRPC methods answered without a token: grpc.health.v1 and V2's server health (as /v2/health/*).
HEALTH_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
})

AUTHORIZATION_HEADER = "Authorization"
AUTHORIZATION_METADATA = "authorization"  # gRPC metadata keys are lower case
SCHEME = "bearer"
MISSING_MESSAGE = "Missing bearer token: send 'Authorization: Bearer <token>'"
INVALID_MESSAGE = "Invalid bearer token"


class TokenAuth:
    """The accepted bearer tokens and the rule for which endpoints stay open."""

    def __init__(self, tokens: Iterable[str], *, protect_metrics: bool = False,
                 metrics_paths: Iterable[str] = DEFAULT_METRICS_PATHS):
        self._tokens = tuple(t.encode("ascii") for t in tokens)
        if not self._tokens:
            raise ValueError("TokenAuth needs at least one token")
        self.protect_metrics = protect_metrics
        self._metrics_paths = frozenset(metrics_paths)

    @classmethod
    def from_file(cls, path: str | Path, *, protect_metrics: bool = False,
                  metrics_paths: Iterable[str] = DEFAULT_METRICS_PATHS) -> TokenAuth:
        """Read the tokens from a token file (see :func:`parse_tokens`)."""
        return cls(read_token_file(path), protect_metrics=protect_metrics, metrics_paths=metrics_paths)

    def rest_path_is_open(self, path: str) -> bool:
        """True when the REST ``path`` is answered without a token."""
        return path in HEALTH_PATHS or (not self.protect_metrics and path in self._metrics_paths)

    def grpc_method_is_open(self, method: str) -> bool:
        """True when the gRPC ``method`` (``/package.Service/Method``) is answered without a token."""
        return method in HEALTH_METHODS

    def check(self, authorization: str | None) -> None:
        """Accept an ``Authorization`` value ``Bearer <token>``; raise ``Unauthenticated`` otherwise."""
        if not authorization:
            raise Unauthenticated(MISSING_MESSAGE)
        scheme, _, candidate = authorization.strip().partition(" ")
        if scheme.lower() != SCHEME:
            raise Unauthenticated(MISSING_MESSAGE)
        presented = candidate.strip().encode("utf-8", "replace")
        # Compare against every token (no early exit) so timing says nothing about which matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        if not matched:
            raise Unauthenticated(INVALID_MESSAGE)

    def check_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | Mapping | None) -> None:
        """:meth:`check` the ``authorization`` entry of gRPC invocation metadata."""
        items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
        value = None
        for key, entry in items:
            if key == AUTHORIZATION_METADATA:
                value = entry.decode("utf-8", "replace") if isinstance(entry, bytes) else entry
                break
        self.check(value)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every RPC without a valid bearer token with UNAUTHENTICATED (health stays open)."""

    def __init__(self, auth: TokenAuth):
        self._auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        """Pass authenticated (or open) calls on; answer the others with UNAUTHENTICATED."""
        if self._auth.grpc_method_is_open(handler_call_details.method):
            return await continuation(handler_call_details)
        try:
            self._auth.check_metadata(handler_call_details.invocation_metadata)
        except Unauthenticated as err:
            return _refusal(await continuation(handler_call_details), err)
        return await continuation(handler_call_details)


def _refusal(handler: grpc.RpcMethodHandler | None, err: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that aborts with ``err``'s status."""

    async def refuse(_request, context):
        await abort(context, err)

    # An unknown method is refused the same way, so callers without a token learn nothing.
    request_streaming = bool(handler and handler.request_streaming)
    response_streaming = bool(handler and handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(request_streaming, response_streaming)]
    # No deserializer: the refused request's bytes are never parsed.
    return factory(refuse)
