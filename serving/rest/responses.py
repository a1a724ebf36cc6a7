"""JSON answers of the REST adapters, errors included: one encoder, one error shape."""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import Response

from serving.codecs import tfs_json
from serving.errors import ServingError, Unauthenticated

JSON_TYPE = "application/json"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``payload`` as JSON (NaN and Infinity allowed, as TF Serving emits them)."""
    return Response(tfs_json.dump_json(payload), status_code=status, headers=headers, media_type=JSON_TYPE)


def error_response(err: ServingError) -> Response:
    """The REST answer to ``err``: ``{"error": message}``, its status, and the headers it calls for."""
    response = json_response({"error": err.message}, err.status)
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if isinstance(err, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="graft-serve"'  # RFC 6750
    return response
