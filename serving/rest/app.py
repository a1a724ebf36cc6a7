"""The REST app: one Starlette application composing /v1, /v2, health and metrics.

``create_app(service, options)`` builds the ASGI app that uvicorn serves on an
event loop of its own (``serving.rest.server``). Every error leaves through one
place: a ``ServingError`` through :func:`serving.rest.responses.error_response`
as ``{"error": "<message>"}`` with the status from ``serving.errors``; anything
else through :func:`serving.errors.unexpected` (a request id, never the
exception's text).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serving.errors import Cancelled, ServingError, unexpected
from serving.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REST_TIMEOUT_MS
from serving.metrics import DEFAULT_METRICS_PATHS
from serving.rest.fanout import fanout_route
from serving.rest.responses import error_response, json_response
from serving.rest.shadow import shadow_route
from serving.rest.tfs import v1_route
from serving.rest.v2 import v2_routes
from serving.runtime.loop import run_blocking

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from serving.runtime.auth import TokenAuth
    from serving.service import InferenceService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestOptions:
    """REST limits: largest accepted body (after gunzip) and the per-request timeout."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_ms: int = DEFAULT_REST_TIMEOUT_MS


def create_app(service: InferenceService, options: RestOptions | None = None,
               metrics_registry: CollectorRegistry | None = None, auth: TokenAuth | None = None,
               metrics_paths: Sequence[str] = DEFAULT_METRICS_PATHS) -> Starlette:
    """The ASGI app serving ``service``; the registry at ``metrics_paths`` only when one is given.

    With ``auth`` every path needs ``Authorization: Bearer <token>`` except those
    ``auth.rest_path_is_open`` names (health; metrics unless protected): 401 otherwise.
    """
    options = options or RestOptions()

    async def healthz(_request: Request) -> Response:
        return json_response({"status": "alive"}, 200 if service.live() else 503)

    async def readyz(_request: Request) -> Response:
        if service.draining:
            return json_response({"status": "draining"}, 503)
        if not service.ready():
            return json_response({"status": "not ready", "models": service.not_ready()}, 503)
        return json_response({"status": "ready"}, 200)

    routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
    if metrics_registry is not None:
        # prometheus_client's exposition module only where metrics are served.
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def metrics(_request: Request) -> Response:
            text = await run_blocking(generate_latest, metrics_registry)
            return Response(text, headers={"Content-Type": CONTENT_TYPE_LATEST})

        routes += [Route(path, metrics) for path in metrics_paths]
    routes += v2_routes(service, options.max_request_bytes, options.timeout_ms)
    routes.append(fanout_route(service, options.max_request_bytes, options.timeout_ms))
    routes.append(shadow_route(service))
    routes.append(v1_route(service, options.max_request_bytes, options.timeout_ms))
    middleware = [Middleware(CatchUnexpected)]
    if auth is not None:
        middleware.append(Middleware(BearerAuth, auth=auth))
    return Starlette(
        routes=routes, middleware=middleware,
        exception_handlers={ServingError: _serving_error, HTTPException: _http_error,
                            ClientDisconnect: _client_gone})


class CatchUnexpected:
    """ASGI middleware: a bug in a route answers 500 with a request id, and is logged once with it.

    Starlette's own last-resort handler would re-raise after answering, and the
    server would log the traceback a second time, without the id.
    """

    def __init__(self, app):
        self._app = app

    async def __call__(self, scope, receive, send) -> None:
        """Run the app; turn an exception raised before the answer started into a 500."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            err = unexpected(exc, log, f"{scope.get('method')} {scope.get('path')}")
            await error_response(err)(scope, receive, send)


class BearerAuth:
    """ASGI middleware: refuse requests without a valid bearer token, except on open paths."""

    def __init__(self, app, auth: TokenAuth):
        self._app = app
        self._auth = auth

    async def __call__(self, scope, receive, send) -> None:
        """Pass open paths and authenticated requests on; answer the others 401 (no body is read)."""
        if scope["type"] == "http" and not self._auth.rest_path_is_open(scope["path"]):
            try:
                self._auth.check(Headers(scope=scope).get("authorization"))
            except ServingError as err:
                await error_response(err)(scope, receive, send)
                return
        await self._app(scope, receive, send)


async def _serving_error(_request: Request, err: ServingError) -> Response:
    return error_response(err)


async def _http_error(_request: Request, err: HTTPException) -> Response:
    # Routing's own refusals (405 on a known path with another method).
    return json_response({"error": err.detail}, err.status_code, err.headers)


async def _client_gone(_request: Request, _err: ClientDisconnect) -> Response:
    # Nobody reads this answer; it is no server error to log.
    return error_response(Cancelled("client closed the connection before the request body arrived"))
