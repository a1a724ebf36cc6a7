"""The REST adapter: TF Serving's /v1 API, model list, health, and an optional /metrics.

``create_app(service)`` builds an ASGI app (Starlette); uvicorn serves it on an
event loop of its own (see ``serving.asgi``). Every TF Serving path goes through
one route and one regular expression, so ``/V1/...`` and ``/v1/...`` behave
alike, and every error leaves through :func:`error_response` as
``{"error": "<message>"}`` with the status from ``serving.errors``.

Predict awaits its batch on the loop, as gRPC does: a waiting request holds no
thread. Everything else that touches the model manager runs in the loop's worker
threads (``--rest_api_num_threads``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serving import codec
from serving.body import DECODE_ON_LOOP_BYTES, read_body
from serving.errors import InvalidArgument, NotFound, ServingError, Unauthenticated
from serving.jsonarray import DenseReader
from serving.loop import run_blocking
from serving.metrics import DEFAULT_METRICS_PATHS
from serving.service import ExamplesCall, PredictCall, version_status_json

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from serving.auth import TokenAuth
    from serving.service import InferenceService


DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
JSON_TYPE = "application/json"

# TF Serving's URL grammar, widened so that malformed variants get a precise 400
# (version and label together, non-digit version) instead of a bare 404.
_MODEL_URL = re.compile(
    r"/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]*))?"
    r"(?:/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[^/:]*))?",
    re.IGNORECASE,
)
_LIST_URL = re.compile(r"/v1/models/?", re.IGNORECASE)


@dataclass(frozen=True)
class RestOptions:
    """REST limits: largest accepted body (after gunzip) and the per-request timeout."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_ms: int = 30_000


def create_app(service: InferenceService, options: RestOptions | None = None,
               metrics_registry: CollectorRegistry | None = None, auth: TokenAuth | None = None,
               metrics_paths: Sequence[str] = DEFAULT_METRICS_PATHS) -> Starlette:
    """The ASGI app serving ``service``; the registry at ``metrics_paths`` only when one is given.

    With ``auth`` every path needs ``Authorization: Bearer <token>`` except those
    ``auth.rest_path_is_open`` names (health; metrics unless protected): 401 otherwise.
    """
    options = options or RestOptions()
    dense_reader = DenseReader()

    async def healthz(_request: Request) -> Response:
        return _json({"status": "alive"}, 200 if service.live() else 503)

    async def readyz(_request: Request) -> Response:
        if service.draining:
            return _json({"status": "draining"}, 503)
        if not service.ready():
            return _json({"status": "not ready"}, 503)
        return _json({"status": "ready"}, 200)

    async def v1(request: Request) -> Response:
        return await _dispatch(service, options, dense_reader, request)

    routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
    if metrics_registry is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def metrics(_request: Request) -> Response:
            text = await run_blocking(generate_latest, metrics_registry)
            return Response(text, headers={"Content-Type": CONTENT_TYPE_LATEST})

        routes += [Route(path, metrics) for path in metrics_paths]

    from serving.rest_v2 import v2_routes  # V2 routes and /openapi.json

    routes += v2_routes(service, options)
    routes.append(Route("/{path:path}", v1, methods=["GET", "POST"]))
    return Starlette(
        routes=routes,
        middleware=[Middleware(BearerAuth, auth=auth)] if auth is not None else [],
        exception_handlers={ServingError: _serving_error, HTTPException: _http_error,
                            ClientDisconnect: _client_gone, Exception: _bug})


def error_response(err: ServingError) -> Response:
    """The REST answer to ``err``: ``{"error": message}``, its status, and the headers it calls for."""
    response = _json({"error": err.message}, err.status)
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if isinstance(err, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="graft-serve"'  # RFC 6750
    return response


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
    return _json({"error": err.detail}, err.status_code, err.headers)


async def _client_gone(_request: Request, _err: ClientDisconnect) -> Response:
    # The client closed the connection before its body arrived: nobody reads this answer,
    # and it is no server error to log (499, nginx's "client closed request").
    return _json({"error": "client closed the connection before the request body arrived"}, 499)


async def _bug(_request: Request, err: Exception) -> Response:
    # Starlette re-raises after this answer, and uvicorn logs the traceback
    # ("Exception in ASGI application"): logging it here too would print it twice.
    return _json({"error": f"Internal error: {type(err).__name__}: {err}"}, 500)


async def _dispatch(service: InferenceService, options: RestOptions, dense_reader: DenseReader,
                    request: Request) -> Response:
    # scope["path"] exactly as sent (decoded); request.url would drop a %0a on re-parsing.
    path, method = request.scope["path"], request.method
    if _LIST_URL.fullmatch(path):
        if method != "GET":
            return _method_not_allowed(request)
        return _json({"models": await run_blocking(service.list_models)})
    match = _MODEL_URL.fullmatch(path)
    if match is None:
        raise NotFound(f"Malformed request: {method} {path}")
    name, label = match["name"], match["label"]
    verb = match["verb"]
    if verb is None:
        version = _version(match["version"], label)
        if method != "GET":
            return _method_not_allowed(request)
        if match["metadata"]:
            return await run_blocking(_metadata, service, name, version, label)
        statuses = await run_blocking(service.model_status, name, version, label)
        return _json({"model_version_status": [version_status_json(s) for s in statuses]})
    verb = verb.lower()
    if verb not in ("predict", "classify", "regress"):
        raise NotFound(f"Malformed request: {method} {path} (unknown method '{match['verb']}')")
    if method != "POST":
        return _method_not_allowed(request)
    start = time.perf_counter()
    try:
        return await _infer(service, options, dense_reader, request, verb, name,
                            _version(match["version"], label), label)
    except ServingError as err:
        # Bodies that are not JSON, too large or malformed count as answered requests too.
        service.observe_refusal("rest", verb, name, err, time.perf_counter() - start)
        raise


async def _infer(service: InferenceService, options: RestOptions, dense_reader: DenseReader, request: Request,
                 verb: str, name: str, version: int | None, label: str | None) -> Response:
    """Answer a predict, classify or regress POST."""
    # From the request's arrival, as the V2 route counts it: a slow upload uses up the timeout too.
    deadline = time.monotonic() + options.timeout_ms / 1000.0
    raw = await _raw_json_body(request, options.max_request_bytes)
    if verb != "predict":
        return await run_blocking(_examples, service, verb, name, version, label, raw, deadline)
    if len(raw) > DECODE_ON_LOOP_BYTES:
        return await run_blocking(_predict, service, name, version, label, raw, deadline, dense_reader)
    call, row_format = _predict_call(name, version, label, raw, deadline, dense_reader)
    result = await service.predict_async(call)
    return _json(codec.encode_predict_json(result.outputs, row_format))


def _version(text: str | None, label: str | None) -> int | None:
    if text is None:
        return None
    if label is not None:
        raise InvalidArgument("Model version and version label cannot both be specified")
    if not text.isascii() or not text.isdigit():
        raise InvalidArgument(f"Model version must be a non-negative integer, got '{text}'")
    return int(text)


def _predict(service: InferenceService, name: str, version: int | None, label: str | None,
             raw: bytes, deadline: float, dense_reader: DenseReader) -> Response:
    """Predict in a worker thread, from parsing the body to encoding the answer."""
    call, row_format = _predict_call(name, version, label, raw, deadline, dense_reader)
    return _json(codec.encode_predict_json(service.predict(call).outputs, row_format))


def _predict_call(name: str, version: int | None, label: str | None, raw: bytes, deadline: float,
                  dense_reader: DenseReader) -> tuple[PredictCall, bool]:
    """The PredictCall of a /v1 predict body, and whether its answer takes the row format."""
    # A body that is one numeric array skips orjson's per-number Python objects.
    dense = dense_reader.read(raw)
    body = dense.as_body() if dense is not None else _json_object(raw)
    signature = _signature_name(body)
    output_filter = body.get("output_filter", [])
    if not isinstance(output_filter, list) or not all(isinstance(o, str) for o in output_filter):
        raise InvalidArgument("'output_filter' must be a list of output names")
    row_format = codec.predict_json_format(body)

    # Decoding needs the signature's dtypes, so the service calls back once it resolved it.
    def decode(sig):
        inputs = codec.dense_predict_inputs(dense.values, sig) if dense is not None else None
        if inputs is None:
            # The general path; a dense body is parsed again for the JSON types it lost.
            inputs = codec.decode_predict_json(_json_object(dense.raw) if dense is not None else body, sig)[0]
        # The parsed JSON (10^4 lists per 96x96 image) is garbage once converted: free it
        # now, not after the batch wait, so concurrent requests do not keep the GC busy.
        body.clear()
        return inputs

    call = PredictCall(
        model=name, version=version, label=label, signature_name=signature,
        inputs=decode, output_filter=output_filter, deadline=deadline, protocol="rest")
    return call, row_format


def _examples(service: InferenceService, verb: str, name: str, version: int | None,
              label: str | None, raw: bytes, deadline: float) -> Response:
    body = _json_object(raw)
    signature = _signature_name(body)
    examples, context = codec.examples_from_json(body)
    call = ExamplesCall(model=name, version=version, label=label, signature_name=signature,
                        examples=examples, context=context, deadline=deadline, protocol="rest")
    # float32 scalars so scores print as TF Serving prints them (shortest float32 form).
    if verb == "classify":
        result = service.classify(call)
        return _json({"results": [[[label_, np.float32(score)] for label_, score in row]
                                  for row in result.classifications]})
    return _json({"results": np.asarray(service.regress(call).values, dtype=np.float32)})


def _metadata(service: InferenceService, name: str, version: int | None,
              label: str | None) -> Response:
    result = service.model_metadata(name, version, label)
    signature_def = json_format.MessageToDict(result.signature_def_map,
                                              preserving_proto_field_name=True)
    # The doubled "signature_def" key is TF Serving's real output shape.
    return _json({
        "model_spec": {"name": result.model, "signature_name": "", "version": str(result.version)},
        "metadata": {"signature_def": signature_def,
                     **({"graft": result.lineage} if result.lineage is not None else {})},
    })


def _signature_name(body: dict) -> str:
    signature = body.get("signature_name", "")
    if not isinstance(signature, str):
        raise InvalidArgument("'signature_name' key must be a string value.")
    return signature


async def _raw_json_body(request: Request, limit: int) -> bytes:
    raw = await read_body(request, limit, encodings=("gzip",))
    if not raw:
        raise InvalidArgument("JSON Parse error: The document is empty")
    return raw


def _json_object(raw: bytes) -> dict:
    body = codec.parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidArgument("JSON Value is not an object")
    return body


def _method_not_allowed(request: Request) -> Response:
    return _json({"error": f"Method {request.method} is not allowed on {request.scope['path']}"}, 405)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(codec.dump_json(payload), status_code=status, headers=headers, media_type=JSON_TYPE)
