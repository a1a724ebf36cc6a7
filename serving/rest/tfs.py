"""TF Serving's REST API (/v1): model list, status, metadata, predict, classify, regress.

Every /v1 path goes through one route and one regular expression, so ``/V1/...``
and ``/v1/...`` behave alike. Errors are raised as ``ServingError`` and leave
through the app's one handler (``serving.rest.app``).

Predict awaits its batch on the loop, as gRPC does: a waiting request holds no
thread. Everything else that touches the model manager runs in the loop's worker
threads (``--rest_api_num_threads``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from graft.contract import LINEAGE_METADATA_KEY
from serving.codecs import tfs_json
from serving.codecs.dense_json import DenseReader
from serving.errors import InvalidArgument, NotFound, ServingError
from serving.rest.body import DECODE_ON_LOOP_BYTES, read_body
from serving.rest.responses import json_response
from serving.runtime.loop import run_blocking
from serving.service import ExamplesCall, PredictCall, version_status_json

if TYPE_CHECKING:
    from serving.service import InferenceService

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


def v1_route(service: InferenceService, max_request_bytes: int, timeout_ms: int) -> Route:
    """The catch-all route answering TF Serving's /v1 API over ``service`` (register it last)."""
    options = _Limits(max_request_bytes, timeout_ms)
    dense_reader = DenseReader()

    async def v1(request: Request) -> Response:
        return await _dispatch(service, options, dense_reader, request)

    return Route("/{path:path}", v1, methods=["GET", "POST"])


@dataclass(frozen=True)
class _Limits:
    max_request_bytes: int
    timeout_ms: int


async def _dispatch(service: InferenceService, options: _Limits, dense_reader: DenseReader,
                    request: Request) -> Response:
    # scope["path"] exactly as sent (decoded); request.url would drop a %0a on re-parsing.
    path, method = request.scope["path"], request.method
    if _LIST_URL.fullmatch(path):
        if method != "GET":
            return _method_not_allowed(request)
        return json_response({"models": await run_blocking(service.list_models)})
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
        return json_response({"model_version_status": [version_status_json(s) for s in statuses]})
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


async def _infer(service: InferenceService, options: _Limits, dense_reader: DenseReader, request: Request,
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
    return json_response(tfs_json.encode_predict_json(result.outputs, row_format))


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
    return json_response(tfs_json.encode_predict_json(service.predict(call).outputs, row_format))


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
    row_format = tfs_json.predict_json_format(body)

    # Decoding needs the signature's dtypes, so the service calls back once it resolved it.
    def decode(sig):
        inputs = tfs_json.dense_predict_inputs(dense.values, sig) if dense is not None else None
        if inputs is None:
            # The general path; a dense body is parsed again for the JSON types it lost.
            inputs = tfs_json.decode_predict_json(_json_object(dense.raw) if dense is not None else body, sig)[0]
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
    examples, context = tfs_json.examples_from_json(body)
    call = ExamplesCall(model=name, version=version, label=label, signature_name=signature,
                        examples=examples, context=context, deadline=deadline, protocol="rest")
    # float32 scalars so scores print as TF Serving prints them (shortest float32 form).
    if verb == "classify":
        result = service.classify(call)
        return json_response({"results": [[[label_, np.float32(score)] for label_, score in row]
                                  for row in result.classifications]})
    return json_response({"results": np.asarray(service.regress(call).values, dtype=np.float32)})


def _metadata(service: InferenceService, name: str, version: int | None,
              label: str | None) -> Response:
    result = service.model_metadata(name, version, label)
    signature_def = json_format.MessageToDict(result.signature_def_map,
                                              preserving_proto_field_name=True)
    # The doubled "signature_def" key is TF Serving's real output shape.
    return json_response({
        "model_spec": {"name": result.model, "signature_name": "", "version": str(result.version)},
        "metadata": {"signature_def": signature_def,
                     **({LINEAGE_METADATA_KEY: result.lineage} if result.lineage is not None else {})},
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
    body = tfs_json.parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidArgument("JSON Value is not an object")
    return body


def _method_not_allowed(request: Request) -> Response:
    return json_response({"error": f"Method {request.method} is not allowed on {request.scope['path']}"}, 405)
