"""Graft's shadow-evaluation route: ``GET /v1/models/{name}/shadow`` (serving.shadow's window as JSON)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.rest.responses import json_response
from serving.runtime.loop import run_blocking

if TYPE_CHECKING:
    from serving.service import InferenceService

SHADOW_PATH = "/v1/models/{name}/shadow"


def shadow_route(service: InferenceService) -> Route:
    """The route answering the live stable-vs-canary comparison of one model (register it before /v1's catch-all)."""

    async def shadow(request: Request) -> Response:
        # The manager's lock is taken: off the loop, as the other status calls are.
        return json_response(await run_blocking(service.shadow_report, request.path_params["name"]))

    return Route(SHADOW_PATH, shadow, methods=["GET"])
