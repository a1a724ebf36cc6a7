"""Graft's fan-out route: ``POST /v1/trunks:fanout``, one image set answered by several models' heads.

The models must share one loaded trunk (``serving.trunks``): the trunk runs once over
the inputs, then each model's head. The body is a TF Serving predict body plus the
list of models::

    {"models": ["a", {"name": "b", "version": 2}, {"name": "c", "label": "stable"}],
     "signature_name": "serving_default",
     "instances": [...]}                      (or "inputs", as /v1 predict takes them)

and the answer has one TF Serving predict answer per model, in the body's order::

    {"results": [{"model": "a", "version": "1", "predictions": [...]}, ...]}

Errors are ``ServingError``s and leave through the app's one handler.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.codecs import tfs_json
from serving.errors import InvalidArgument, ServingError
from serving.rest.body import read_body
from serving.rest.responses import json_response
from serving.runtime.loop import run_blocking
from serving.service import FanOutCall, ModelRef

if TYPE_CHECKING:
    from serving.service import InferenceService

FANOUT_PATH = "/v1/trunks:fanout"


def fanout_route(service: InferenceService, max_request_bytes: int, timeout_ms: int) -> Route:
    """The fan-out route (register it before /v1's catch-all)."""

    async def fanout(request: Request) -> Response:
        deadline = time.monotonic() + timeout_ms / 1000.0
        start = time.perf_counter()
        try:
            raw = await read_body(request, max_request_bytes, encodings=("gzip",))
            call, row_format = _fanout_call(raw, deadline)
        except ServingError as err:
            # A body that cannot be read counts as an answered request, as /v1's do.
            service.observe_refusal("rest", "fan_out", "", err, time.perf_counter() - start)
            raise
        # One trunk pass and several heads: off the loop, as other blocking calls are.
        results = await run_blocking(service.fan_out, call)
        return json_response({"results": [
            {"model": r.model, "version": str(r.version), **tfs_json.encode_predict_json(r.outputs, row_format)}
            for r in results]})

    return Route(FANOUT_PATH, fanout, methods=["POST"])


def _fanout_call(raw: bytes, deadline: float) -> tuple[FanOutCall, bool]:
    """The FanOutCall of a fan-out body, and whether its answers take the row format."""
    if not raw:
        raise InvalidArgument("JSON Parse error: The document is empty")
    body = tfs_json.parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidArgument("JSON Value is not an object")
    models = body.pop("models", None)
    if not isinstance(models, list) or not models:
        raise InvalidArgument("'models' must be a non-empty list of model names or {name, version | label} objects")
    refs = [_model_ref(entry) for entry in models]
    signature = body.get("signature_name", "")
    if not isinstance(signature, str):
        raise InvalidArgument("'signature_name' key must be a string value.")
    row_format = tfs_json.predict_json_format(body)
    call = FanOutCall(models=refs, signature_name=signature,
                      inputs=lambda sig: tfs_json.decode_predict_json(body, sig)[0], deadline=deadline)
    return call, row_format


def _model_ref(entry) -> ModelRef:
    if isinstance(entry, str) and entry:
        return ModelRef(entry)
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise InvalidArgument(f"each of 'models' must be a model name or an object with a 'name', got {entry!r:.80}")
    version, label = entry.get("version"), entry.get("label")
    if version is not None and label is not None:
        raise InvalidArgument("Model version and version label cannot both be specified")
    if isinstance(version, str) and version.isascii() and version.isdigit():
        version = int(version)
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
        raise InvalidArgument(f"Model version must be a non-negative integer, got {version!r:.40}")
    if label is not None and not isinstance(label, str):
        raise InvalidArgument("a model's 'label' must be a string")
    return ModelRef(entry["name"], version, label)
