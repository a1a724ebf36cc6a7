"""The REST adapter: TF Serving's /v1 API, model list, health, and an optional /metrics.

``create_app(service)`` builds a Flask app; waitress serves it (see ``serving.main``).
Every TF Serving path goes through one route and one regular expression, so
``/V1/...`` and ``/v1/...`` behave alike, and every error leaves through one
handler as ``{"error": "<message>"}`` with the status from ``serving.errors``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flask import Flask, Response, request
from google.protobuf import json_format
from werkzeug.exceptions import HTTPException

from serving import codec
from serving.body import read_body
from serving.errors import InvalidArgument, NotFound, ServingError, Unauthenticated
from serving.jsonarray import DenseBody, DenseReader
from serving.service import ExamplesCall, PredictCall, version_status_json

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from serving.auth import TokenAuth
    from serving.service import InferenceService

log = logging.getLogger(__name__)

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
               metrics_registry: CollectorRegistry | None = None, auth: TokenAuth | None = None) -> Flask:
    """The Flask app serving ``service``; ``/metrics`` only when a registry is given.

    With ``auth`` every path needs ``Authorization: Bearer <token>`` except those
    ``auth.rest_path_is_open`` names (health; metrics unless protected): 401 otherwise.
    """
    options = options or RestOptions()
    app = Flask("graft-serve")

    if auth is not None:
        @app.before_request
        def _authenticate():
            if not auth.rest_path_is_open(request.path):
                auth.check(request.headers.get("Authorization"))

    @app.errorhandler(ServingError)
    def _serving_error(err: ServingError):
        response = _json({"error": err.message}, err.status)
        if err.retry_after is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
        if isinstance(err, Unauthenticated):
            response.headers["WWW-Authenticate"] = 'Bearer realm="graft-serve"'  # RFC 6750
        return response

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        return _json({"error": err.description or err.name}, err.code or 500)

    @app.errorhandler(Exception)
    def _bug(err: Exception):
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return _json({"error": f"Internal error: {type(err).__name__}: {err}"}, 500)

    @app.get("/healthz")
    def _healthz():
        return _json({"status": "alive"}, 200 if service.live() else 503)

    @app.get("/readyz")
    def _readyz():
        if service.draining:
            return _json({"status": "draining"}, 503)
        if not service.ready():
            return _json({"status": "not ready"}, 503)
        return _json({"status": "ready"}, 200)

    if metrics_registry is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        def _metrics():
            return Response(generate_latest(metrics_registry), content_type=CONTENT_TYPE_LATEST)

        app.add_url_rule("/metrics", "metrics", _metrics)
        app.add_url_rule("/monitoring/prometheus/metrics", "prometheus_metrics", _metrics)

    from serving.rest_v2 import v2_blueprint  # V2 routes and /openapi.json

    app.register_blueprint(v2_blueprint(service, options))
    dense_reader = DenseReader()

    @app.route("/<path:_path>", methods=["GET", "POST"])
    def _v1(_path: str):
        return _dispatch(service, options, dense_reader)

    return app


def _dispatch(service: InferenceService, options: RestOptions, dense_reader: DenseReader) -> Response:
    path = request.path
    if _LIST_URL.fullmatch(path):
        if request.method != "GET":
            return _method_not_allowed()
        return _json({"models": service.list_models()})
    match = _MODEL_URL.fullmatch(path)
    if match is None:
        raise NotFound(f"Malformed request: {request.method} {path}")
    name, label = match["name"], match["label"]
    version = _version(match["version"], label)
    verb = match["verb"]
    if verb is None:
        if request.method != "GET":
            return _method_not_allowed()
        if match["metadata"]:
            return _metadata(service, name, version, label)
        statuses = service.model_status(name, version, label)
        return _json({"model_version_status": [version_status_json(s) for s in statuses]})
    verb = verb.lower()
    if verb not in ("predict", "classify", "regress"):
        raise NotFound(f"Malformed request: {request.method} {path} (unknown method '{match['verb']}')")
    if request.method != "POST":
        return _method_not_allowed()
    raw = _raw_json_body(options.max_request_bytes)
    deadline = time.monotonic() + options.timeout_ms / 1000.0
    if verb == "predict":
        # A body that is one numeric array skips orjson's per-number Python objects.
        dense = dense_reader.read(raw)
        if dense is not None:
            return _predict(service, name, version, label, dense.as_body(), deadline, dense)
        return _predict(service, name, version, label, _json_object(raw), deadline)
    return _examples(service, verb, name, version, label, _json_object(raw), deadline)


def _version(text: str | None, label: str | None) -> int | None:
    if text is None:
        return None
    if label is not None:
        raise InvalidArgument("Model version and version label cannot both be specified")
    if not text.isascii() or not text.isdigit():
        raise InvalidArgument(f"Model version must be a non-negative integer, got '{text}'")
    return int(text)


def _predict(service: InferenceService, name: str, version: int | None, label: str | None,
             body: dict, deadline: float, dense: DenseBody | None = None) -> Response:
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
    result = service.predict(call)
    return _json(codec.encode_predict_json(result.outputs, row_format))


def _examples(service: InferenceService, verb: str, name: str, version: int | None,
              label: str | None, body: dict, deadline: float) -> Response:
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


def _raw_json_body(limit: int) -> bytes:
    raw = read_body(limit, encodings=("gzip",))
    if not raw:
        raise InvalidArgument("JSON Parse error: The document is empty")
    return raw


def _json_object(raw: bytes) -> dict:
    body = codec.parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidArgument("JSON Value is not an object")
    return body


def _method_not_allowed() -> Response:
    return _json({"error": f"Method {request.method} is not allowed on {request.path}"}, 405)


def _json(payload: Any, status: int = 200) -> Response:
    return Response(codec.dump_json(payload), status=status, mimetype=JSON_TYPE)
