"""The V2 (Open Inference Protocol) REST routes, and the OpenAPI document, as Starlette routes.

``v2_routes(service, options)`` are mounted by ``rest.create_app``; errors
raise ``ServingError`` and leave through that app's one handler as
``{"error": "..."}`` with the status from ``serving.errors``. Health answers
follow the protocol: 200 for true, 400 for false, with an empty body.

The binary tensor data extension (Triton's, used by ``tritonclient.http``) is
supported both ways. A request whose JSON header is followed by raw tensor data
says so with ``Inference-Header-Content-Length`` (the JSON's byte length), and
each such input gives ``parameters.binary_data_size`` instead of ``data``; the
raw parts follow in input order. An output is returned as raw data when it asks
for it (``parameters.binary_data``) or, failing that, when the request's
``parameters.binary_data_output`` is true; the response then carries the same
header and the raw parts after its JSON, in output order.

Triton's statistics, model repository and model configuration extensions answer
in Triton's JSON shapes, built by ``serving.codecs.v2``: ``GET
/v2/models[/{m}[/versions/{v}]]/stats``, ``POST /v2/repository/index``, ``POST
/v2/repository/models/{m}/load`` and ``/unload`` (an empty body, or a JSON object),
and ``GET /v2/models/{m}[/versions/{v}]/config``.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.codecs import tfs_json, v2
from serving.errors import InvalidArgument, ServingError
from serving.rest.body import DECODE_ON_LOOP_BYTES, read_body
from serving.rest.responses import JSON_TYPE, json_response
from serving.runtime.loop import run_blocking

if TYPE_CHECKING:
    from serving.service import InferenceService

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_TYPE = "application/octet-stream"
OPENAPI_FILE = "openapi.json"
PROTOCOL = "rest_v2"
_READY = {True: 200, False: 400}


def openapi_document() -> bytes:
    """The OpenAPI 3 document of the whole REST surface (package data ``serving/openapi.json``)."""
    return resources.files("serving").joinpath(OPENAPI_FILE).read_bytes()


def v2_routes(service: InferenceService, max_request_bytes: int, timeout_ms: int) -> list[Route]:
    """The routes serving V2 over ``service`` and ``/openapi.json``, with the REST limits."""
    document = openapi_document()
    reader = v2.JsonReader()

    async def openapi(_request: Request) -> Response:
        return Response(document, media_type=JSON_TYPE)

    async def server_metadata(_request: Request) -> Response:
        return json_response(v2.server_metadata())

    async def live(_request: Request) -> Response:
        return _empty(_READY[service.live()])

    async def ready(_request: Request) -> Response:
        if service.ready():
            return _empty(_READY[True])
        # Clients read the status alone; the body tells a person why.
        reasons = service.not_ready()
        why = "draining" if service.draining else "; ".join(f"model {n}: {r}" for n, r in sorted(reasons.items()))
        return json_response({"error": f"not ready: {why or 'starting'}"}, _READY[False])

    async def model_ready(request: Request) -> Response:
        name, version = _model_of(request)
        try:
            is_ready = await run_blocking(v2.model_ready, service, name, version)
        except ServingError as err:
            # Any 4xx means "false" in the protocol; keep the code (404: unknown model or version).
            return _empty(err.status if 400 <= err.status < 500 else _READY[False])
        return _empty(_READY[is_ready])

    async def model_metadata(request: Request) -> Response:
        name, version = _model_of(request)
        return json_response((await run_blocking(v2.model_metadata, service, name, version)).to_json())

    async def model_config(request: Request) -> Response:
        name, version = _model_of(request)
        return json_response(await run_blocking(v2.model_config, service, name, version))

    async def statistics(request: Request) -> Response:
        name = request.path_params.get("name", "")
        version = request.path_params.get("version", "")
        return json_response(await run_blocking(v2.model_statistics, service, name, version))

    async def repository_index(request: Request) -> Response:
        body = await _json_object(request, max_request_bytes, "repository index request")
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("'ready' must be true or false")
        return json_response(await run_blocking(v2.repository_index, service, ready))

    async def load(request: Request) -> Response:
        body = await _json_object(request, max_request_bytes, "load request")
        parameters = _parameters(body.get("parameters"), "load request")
        await run_blocking(v2.load_model, service, request.path_params["name"], parameters)
        return _empty(200)

    async def unload(request: Request) -> Response:
        body = await _json_object(request, max_request_bytes, "unload request")
        parameters = _parameters(body.get("parameters"), "unload request")
        await run_blocking(v2.unload_model, service, request.path_params["name"], parameters)
        return _empty(200)

    async def infer(request: Request) -> Response:
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_ms / 1000.0
        name, version = _model_of(request)
        try:
            body = await read_body(request, max_request_bytes)
            header_length = request.headers.get(HEADER_LENGTH)
            if len(body) > DECODE_ON_LOOP_BYTES:
                return await run_blocking(_infer, service, body, header_length, name, version, deadline, reader)
            infer_request = _infer_request(body, header_length, name, version, deadline, reader)
            return encode_response(await v2.infer_async(service, infer_request), infer_request)
        except ServingError as err:
            # Bodies that are not JSON, too large or malformed count as answered requests too.
            service.observe_refusal(PROTOCOL, "predict", name, err, time.perf_counter() - start)
            raise

    return [
        Route("/openapi.json", openapi),
        Route("/v2", server_metadata),
        Route("/v2/", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        # Before /v2/models/{name}, which would take "stats" for a model's name (as in Triton).
        Route("/v2/models/stats", statistics),
        Route("/v2/models/{name}/stats", statistics),
        Route("/v2/models/{name}/versions/{version}/stats", statistics),
        Route("/v2/models/{name}/config", model_config),
        Route("/v2/models/{name}/versions/{version}/config", model_config),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    ]


def _model_of(request: Request) -> tuple[str, str]:
    return request.path_params["name"], request.path_params.get("version", "")


def _infer(service: InferenceService, body: bytes, header_length: str | None, name: str, version: str,
           deadline: float, reader: v2.JsonReader) -> Response:
    """A whole V2 infer in a worker thread, for bodies too large to decode on the loop."""
    infer_request = _infer_request(body, header_length, name, version, deadline, reader)
    return encode_response(v2.infer(service, infer_request), infer_request)


def _infer_request(body: bytes, header_length: str | None, name: str, version: str,
                   deadline: float, reader: v2.JsonReader) -> v2.InferRequest:
    infer_request = decode_request(body, header_length, name, version, reader)
    infer_request.deadline = deadline
    return infer_request


# --------------------------------------------------------------------- requests


def decode_request(body: bytes, header_length: str | None, model: str, version: str,
                   reader: v2.JsonReader | None = None) -> v2.InferRequest:
    """A V2 REST infer body (JSON, optionally followed by binary tensor data) -> InferRequest.

    ``reader`` (one per app) parses the JSON, floating-point data without a Python
    object per number; without it the general parser does."""
    binary = memoryview(b"")
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} must be an integer between 0 and the body size ({len(body)}), "
                f"got {header_length!r}")
        binary = memoryview(body)[size:]
        body = body[:size]
    if not body:
        raise InvalidArgument("JSON Parse error: The document is empty")
    doc = reader.parse(body) if reader is not None else tfs_json.parse_json(body)
    if not isinstance(doc, dict):
        raise InvalidArgument("inference request must be a JSON object")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    parameters = _parameters(doc.get("parameters"), "request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    inputs = []
    offset = 0
    for index, item in enumerate(raw_inputs):
        tensor, used = _decode_input(item, index, binary, offset)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise InvalidArgument(
            f"the binary tensor data holds {len(binary)} bytes but the inputs' binary_data_size "
            f"add up to {offset}")
    outputs = _requested_outputs(doc.get("outputs"))
    return v2.InferRequest(model=model, version=version, id=request_id, inputs=inputs,
                           outputs=outputs, parameters=parameters, protocol=PROTOCOL)


def _decode_input(item: Any, index: int, binary: memoryview, offset: int) -> tuple[v2.InferInput, int]:
    if not isinstance(item, dict):
        raise InvalidArgument(f"inputs[{index}] must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"inputs[{index}] needs a 'name' string")
    for key in ("datatype", "shape"):
        if key not in item:
            raise InvalidArgument(f"input '{name}' needs '{key}'")
    datatype, shape = item["datatype"], item["shape"]
    parameters = _parameters(item.get("parameters"), f"input '{name}'")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise InvalidArgument(f"input '{name}' needs 'data' or parameters.binary_data_size")
        return v2.InferInput(name, datatype, v2.json_to_array(name, datatype, shape, item["data"])), 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"input '{name}': binary_data_size must be a non-negative integer")
    if "data" in item:
        raise InvalidArgument(f"input '{name}' gives both 'data' and binary_data_size")
    if offset + size > len(binary):
        raise InvalidArgument(
            f"input '{name}': binary_data_size {size} runs past the {len(binary)} bytes of binary data"
            + ("" if binary else f" (is the {HEADER_LENGTH} header missing?)"))
    raw = binary[offset:offset + size]
    return v2.InferInput(name, datatype, v2.raw_to_array(name, datatype, shape, raw)), size


def _requested_outputs(value: Any) -> list[v2.RequestedOutput]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument("'outputs' must be a list of {\"name\": ...} objects")
    outputs = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument(f"outputs[{index}] needs a 'name' string")
        outputs.append(v2.RequestedOutput(item["name"], _parameters(item.get("parameters"),
                                                                    f"output '{item['name']}'")))
    return outputs


async def _json_object(request: Request, max_request_bytes: int, what: str) -> dict:
    """A small JSON object body; an empty body is an empty object (as Triton's clients send)."""
    body = await read_body(request, max_request_bytes)
    if not body.strip():
        return {}
    doc = tfs_json.parse_json(body)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"the {what} must be a JSON object")
    return doc


def _parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: 'parameters' must be a JSON object")
    return value


# -------------------------------------------------------------------- responses


def encode_response(result: v2.InferResponse, infer_request: v2.InferRequest) -> Response:
    """JSON response, with binary tensor data appended for the outputs that asked for it."""
    default_binary = _flag(infer_request.parameters.get("binary_data_output"), "binary_data_output")
    per_output = {o.name: o.parameters for o in infer_request.outputs}
    outputs, parts = [], []
    for out in result.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        asked = per_output.get(out.name, {}).get("binary_data")
        if asked is None:
            binary = default_binary
        else:
            binary = _flag(asked, f"output '{out.name}' binary_data")
        if binary:
            raw = v2.array_to_raw(out.array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = v2.array_to_json_data(out.name, out.array)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": result.model, "model_version": result.version}
    if result.id:
        body["id"] = result.id
    body["outputs"] = outputs
    header = tfs_json.dump_json(body)
    if not parts:
        return Response(header, media_type=JSON_TYPE)
    return Response(b"".join([header, *parts]), media_type=BINARY_TYPE,
                    headers={HEADER_LENGTH: str(len(header))})


def _flag(value: Any, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter {what} must be true or false")
    return value


# ----------------------------------------------------------------------- bodies


def _empty(status: int) -> Response:
    # The protocol's health answers carry their result in the status alone.
    return Response(b"", status_code=status)
