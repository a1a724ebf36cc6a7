"""The Open Inference Protocol (V2) data plane, independent of REST and gRPC.

Both V2 adapters (``serving.rest.v2``, ``serving.grpc.v2``) decode their wire format into the
plain dataclasses here, call :func:`infer`, :func:`model_metadata`,
:func:`model_ready` or :func:`server_metadata`, and encode the answer. This
module owns the V2 rules: datatype names and their numpy dtypes, tensors given
as JSON data, as typed proto contents or as raw little-endian bytes (BYTES
elements carry a 4-byte little-endian length prefix, as in Triton), and the
check that the data fills the declared shape exactly. Every bad input raises
``InvalidArgument`` naming the tensor.

Triton's extensions are answered here too, in the JSON shapes of Triton's
documents (the gRPC adapter parses the same dicts into its messages, whose field
names are Triton's): statistics (:func:`model_statistics`), the model repository
(:func:`repository_index`, :func:`load_model`, :func:`unload_model`) and the model
configuration (:func:`model_config`).

V2 has no signatures: a request runs ``serving_default`` unless its parameter
``signature_name`` names another. A ``model_version`` of digits selects that
version; any other non-empty text is taken as a version label (``stable``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import simdjson
from tensorflow.core.framework import types_pb2

from graft import contract
from serving import __version__
from serving.codecs import tfs_json
from serving.codecs.dense_json import ParserPool, plain
from serving.errors import FailedPrecondition, InvalidArgument, Unimplemented
from serving.service import DEFAULT_SIGNATURE, PredictCall

if TYPE_CHECKING:
    from serving.config import VersionPolicy
    from serving.servable import TensorSpec
    from serving.service import InferenceService, ModelDescription, PredictResult, RepositoryModel
    from serving.statistics import Duration, StatisticsSnapshot

SERVER_NAME = "graft"
PLATFORM = "tensorflow_savedmodel"
# Extensions named as Triton names them, so clients that check for one find it.
EXTENSIONS = ("binary_tensor_data", "statistics", "model_repository", "model_configuration")
BACKEND = "tensorflow"
SIGNATURE_PARAMETER = "signature_name"
LINEAGE_KEY = contract.LINEAGE_METADATA_KEY
BYTES = "BYTES"

# V2 datatype -> numpy dtype; fixed-width types little-endian, as the wire is.
DATATYPES: Mapping[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    BYTES: np.dtype(object),
}
_BY_KIND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if dt.kind != "O"}

# TensorFlow DataType -> V2 datatype, for metadata read from signature defs.
_TF_DATATYPES = {
    types_pb2.DT_BOOL: "BOOL", types_pb2.DT_UINT8: "UINT8", types_pb2.DT_UINT16: "UINT16",
    types_pb2.DT_UINT32: "UINT32", types_pb2.DT_UINT64: "UINT64", types_pb2.DT_INT8: "INT8",
    types_pb2.DT_INT16: "INT16", types_pb2.DT_INT32: "INT32", types_pb2.DT_INT64: "INT64",
    types_pb2.DT_HALF: "FP16", types_pb2.DT_FLOAT: "FP32", types_pb2.DT_DOUBLE: "FP64",
    types_pb2.DT_STRING: BYTES,
}

# A BYTES element's length prefix: uint32, little-endian.
_LENGTH = struct.Struct("<I")


@dataclass
class InferInput:
    """One decoded input tensor."""

    name: str
    datatype: str
    array: np.ndarray


@dataclass
class RequestedOutput:
    """One output the client asked for, with its (protocol-specific) parameters."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    """A V2 inference request, whatever protocol carried it.

    ``deadline`` is a ``time.monotonic()`` instant; ``protocol`` labels metrics.
    """

    model: str
    version: str = ""
    id: str = ""
    inputs: Sequence[InferInput] = ()
    outputs: Sequence[RequestedOutput] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    deadline: float | None = None
    protocol: str = "rest_v2"


@dataclass
class InferOutput:
    """One output tensor of a response."""

    name: str
    datatype: str
    array: np.ndarray

    @property
    def shape(self) -> list[int]:
        """The tensor's shape as a list."""
        return list(self.array.shape)


@dataclass
class InferResponse:
    """The outputs of one inference and the version that produced them."""

    model: str
    version: str
    id: str
    outputs: list[InferOutput]


@dataclass
class TensorMetadata:
    """Name, V2 datatype and shape (-1 for a free dimension) of one tensor."""

    name: str
    datatype: str
    shape: list[int]

    def to_json(self) -> dict:
        """The V2 REST ``$metadata_tensor`` object."""
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass
class ModelMetadata:
    """A model version's V2 metadata plus its lineage (``assets.extra/graft.json``), if any."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    lineage: dict | None = None

    def to_json(self) -> dict:
        """The V2 REST ``$metadata_model_response``; lineage goes under ``parameters.graft``."""
        body = {
            "name": self.name,
            "versions": self.versions,
            "platform": self.platform,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }
        if self.lineage is not None:
            body["parameters"] = {LINEAGE_KEY: self.lineage}
        return body


# ------------------------------------------------------------------ service calls


def server_metadata() -> dict:
    """The V2 ``$metadata_server_response``."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def parse_version(text: str | None) -> tuple[int | None, str | None]:
    """A V2 version string -> (version, label): digits are a version, other text a label."""
    if not text:
        return None, None
    if text.isascii() and text.isdigit():
        return int(text), None
    return None, text


def model_ready(service: InferenceService, name: str, version: str = "") -> bool:
    """Whether ``name`` (that version, or any) is AVAILABLE; NotFound for an unknown model."""
    number, label = parse_version(version)
    return any(s.state == "AVAILABLE" for s in service.model_status(name, number, label))


def model_metadata(service: InferenceService, name: str, version: str = "") -> ModelMetadata:
    """The resolved version's default signature as V2 tensors, the served versions and lineage."""
    number, label = parse_version(version)
    result = service.model_metadata(name, number, label)
    versions = [str(s.version) for s in service.model_status(name) if s.state == "AVAILABLE"]
    signature = result.signature_def_map.signature_def.get(DEFAULT_SIGNATURE)
    inputs = _tensor_metadata(signature.inputs) if signature is not None else []
    outputs = _tensor_metadata(signature.outputs) if signature is not None else []
    return ModelMetadata(result.model, sorted(versions, key=int), PLATFORM, inputs, outputs,
                         result.lineage)


def _tensor_metadata(infos) -> list[TensorMetadata]:
    tensors = []
    for alias in sorted(infos):
        info = infos[alias]
        datatype = _TF_DATATYPES.get(info.dtype, types_pb2.DataType.Name(info.dtype))
        # V2 cannot say "unknown rank"; one free dimension is the least wrong answer.
        shape = ([-1] if info.tensor_shape.unknown_rank
                 else [d.size if d.size >= 0 else -1 for d in info.tensor_shape.dim])
        tensors.append(TensorMetadata(alias, datatype, shape))
    return tensors


def infer(service: InferenceService, request: InferRequest) -> InferResponse:
    """Run one V2 request through the service (validation, batching, metrics included)."""
    return _response(request, service.predict(_predict_call(request)))


async def infer_async(service: InferenceService, request: InferRequest) -> InferResponse:
    """:func:`infer` for an event loop: the wait for the batch holds no thread."""
    return _response(request, await service.predict_async(_predict_call(request)))


def _predict_call(request: InferRequest) -> PredictCall:
    number, label = parse_version(request.version)
    inputs: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        if tensor.name in inputs:
            raise InvalidArgument(f"input '{tensor.name}' is given more than once")
        inputs[tensor.name] = tensor.array
    wanted = []
    for output in request.outputs:
        if "classification" in output.parameters:
            raise Unimplemented(f"output '{output.name}': the classification extension is not supported")
        wanted.append(output.name)
    signature = request.parameters.get(SIGNATURE_PARAMETER, "")
    if not isinstance(signature, str):
        raise InvalidArgument(f"parameter '{SIGNATURE_PARAMETER}' must be a string")
    return PredictCall(
        model=request.model, version=number, label=label, signature_name=signature,
        inputs=inputs, output_filter=wanted, deadline=request.deadline, protocol=request.protocol)


def _response(request: InferRequest, result: PredictResult) -> InferResponse:
    outputs = [InferOutput(name, datatype_of(name, arr), np.asarray(arr))
               for name, arr in result.outputs.items()]
    return InferResponse(result.model, str(result.version), request.id, outputs)


# ------------------------------------------------------------------------ tensors


def numpy_dtype(name: str, datatype: Any) -> np.dtype:
    """The numpy dtype of a V2 datatype; InvalidArgument naming tensor ``name`` otherwise."""
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidArgument(
            f"tensor '{name}': unsupported datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    return dtype


def datatype_of(name: str, arr: np.ndarray) -> str:
    """The V2 datatype of an output array; Unimplemented for a dtype V2 cannot carry."""
    dtype = np.asarray(arr).dtype
    if dtype.kind in "OSU":
        return BYTES
    datatype = _BY_KIND_SIZE.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise Unimplemented(f"output '{name}' has dtype {dtype.name}, which V2 cannot carry")
    return datatype


# The most elements any shape may describe (before it is checked against the data sent).
MAX_SHAPE_ELEMENTS = 2**48


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """A V2 shape (list of non-negative integers) as a tuple."""
    if not isinstance(shape, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidArgument(f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > tfs_json.MAX_JSON_RANK:
        raise InvalidArgument(f"tensor '{name}': rank {len(shape)} exceeds the limit of {tfs_json.MAX_JSON_RANK}")
    # A zero-size tensor may still claim absurd other dimensions, which numpy cannot even shape.
    if math.prod(d for d in shape if d) > MAX_SHAPE_ELEMENTS:
        raise InvalidArgument(f"tensor '{name}': shape {list(shape)} is too large")
    return tuple(shape)


def _fill(name: str, flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    if flat.size != count:
        raise InvalidArgument(
            f"tensor '{name}' has {flat.size} elements but shape {list(shape)} needs {count}")
    return flat.reshape(shape)


def json_to_array(name: str, datatype: Any, shape: Any, data: Any) -> np.ndarray:
    """A V2 JSON tensor (``data`` nested or flat, row-major; or the float64 array
    :class:`JsonReader` read it as) -> ndarray of its datatype."""
    dtype = numpy_dtype(name, datatype)
    shape = check_shape(name, shape)
    if isinstance(data, np.ndarray):
        return _fill(name, data.astype(dtype.newbyteorder("="), copy=False), shape)
    if not isinstance(data, list):
        raise InvalidArgument(f"tensor '{name}': data must be a JSON array")
    arr = tfs_json.json_to_array(data, dtype, name)
    if dtype.kind != "O" and arr.dtype.kind == "O":
        raise InvalidArgument(f"tensor '{name}': {datatype} data must be numbers, not strings")
    return _fill(name, arr.reshape(-1), shape)


# Datatypes whose flat JSON data JsonReader reads in C: any JSON number becomes one of
# them exactly as the general path's np.asarray(...).astype(...) would make it.
_DENSE_DATATYPES = frozenset({"FP16", "FP32", "FP64"})


class JsonReader:
    """Parses V2 JSON inference bodies; the data of floating-point tensors without a Python
    object per number.

    A 96x96x3 image is 27,648 numbers: orjson and ``np.asarray`` create, convert and
    free a Python float for each, on the event loop. Here pysimdjson validates the body
    and copies the numbers of each FP16/FP32/FP64 input's flat ``data`` array straight
    into a float64 buffer. It takes a body only when the arrays it knows of (``inputs``,
    ``outputs``, each input's ``shape`` and ``data``) account for every ``[`` in it, so
    nested data, arrays in parameters and brackets inside strings all go to the general
    path, which owns every error message, as does anything that is not strict JSON
    (NaN, Infinity) or has a repeated key. One simdjson parser per thread.
    """

    def __init__(self) -> None:
        self._parsers = ParserPool()

    def parse(self, raw: bytes) -> Any:
        """The body as the general path parses it (``tfs_json.parse_json``), except that the
        ``data`` of a floating-point input may be a flat float64 ndarray."""
        body = self._dense(raw)
        return body if body is not None else tfs_json.parse_json(raw)

    def _dense(self, raw: bytes) -> dict | None:
        parser = self._parsers.get(len(raw))
        try:
            # Every proxy into the document dies with _dense_body's frame, as the parser
            # requires before it parses again.
            return _dense_body(parser.parse(raw), raw.count(b"["))
        except (ValueError, TypeError, RuntimeError, KeyError):
            return None  # not strict JSON, or not a body this reader takes


def _unique_keys(obj: simdjson.Object) -> list[str] | None:
    keys = list(obj.keys())
    return keys if len(set(keys)) == len(keys) else None  # orjson keeps the last of a repeated key


def _dense_body(doc: Any, brackets: int) -> dict | None:
    if not isinstance(doc, simdjson.Object):
        return None
    keys = _unique_keys(doc)
    inputs = doc["inputs"] if keys is not None and "inputs" in keys else None
    if not isinstance(inputs, simdjson.Array):
        return None
    known = 1 + sum(isinstance(doc[k], simdjson.Array) for k in keys if k == "outputs")
    items = []
    for item in inputs:
        item_keys = _unique_keys(item) if isinstance(item, simdjson.Object) else None
        if item_keys is None:
            return None
        tensor = {k: plain(item[k]) for k in item_keys if k != "data"}
        known += isinstance(tensor.get("shape"), list)
        if "data" in item_keys:
            data = item["data"]
            known += isinstance(data, simdjson.Array)
            if isinstance(data, simdjson.Array) and tensor.get("datatype") in _DENSE_DATATYPES:
                tensor["data"] = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
            else:
                tensor["data"] = plain(data)
        items.append(tensor)
    if known != brackets:
        return None
    return {**{k: plain(doc[k]) for k in keys if k != "inputs"}, "inputs": items}


def raw_to_array(name: str, datatype: Any, shape: Any, raw: bytes | memoryview) -> np.ndarray:
    """Raw V2 tensor bytes (little-endian; BYTES length-prefixed) -> ndarray."""
    dtype = numpy_dtype(name, datatype)
    shape = check_shape(name, shape)
    if dtype.kind == "O":
        return _fill(name, deserialize_bytes(name, raw), shape)
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"tensor '{name}' has {len(raw)} bytes of raw data but shape {list(shape)} of "
            f"{datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def deserialize_bytes(name: str, raw: bytes | memoryview) -> np.ndarray:
    """Length-prefixed BYTES elements -> 1-D object array of bytes."""
    view = memoryview(raw)
    items = []
    offset = 0
    while offset < len(view):
        if offset + _LENGTH.size > len(view):
            raise InvalidArgument(f"tensor '{name}': BYTES data ends inside a length prefix")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + size > len(view):
            raise InvalidArgument(f"tensor '{name}': BYTES element of {size} bytes runs past the data")
        items.append(bytes(view[offset:offset + size]))
        offset += size
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def array_to_raw(arr: np.ndarray) -> bytes:
    """An ndarray -> raw V2 bytes (row-major, little-endian; BYTES length-prefixed)."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "OSU":
        parts = []
        for item in arr.reshape(-1).tolist():
            data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def array_to_json_data(name: str, arr: np.ndarray) -> Any:
    """An ndarray -> the flat JSON ``data`` list (BYTES as UTF-8 text)."""
    flat = np.asarray(arr).reshape(-1)
    if flat.dtype.kind not in "OSU":
        return flat
    texts = []
    for item in flat.tolist():
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise FailedPrecondition(
                f"output '{name}' holds bytes that are not UTF-8 text; request it as binary data "
                f"(parameters: {{\"binary_data\": true}})") from None
    return texts


# Typed InferTensorContents field per V2 datatype (FP16 travels only as raw bytes).
CONTENTS_FIELDS: Mapping[str, str] = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", BYTES: "bytes_contents",
}


def contents_to_array(name: str, datatype: Any, shape: Any, contents) -> np.ndarray:
    """An ``InferTensorContents`` message -> ndarray; values out of the datatype's range are refused."""
    dtype = numpy_dtype(name, datatype)
    shape = check_shape(name, shape)
    field_name = CONTENTS_FIELDS.get(datatype)
    if field_name is None:
        raise InvalidArgument(f"tensor '{name}': {datatype} data must be sent in raw_input_contents")
    values = getattr(contents, field_name)
    if dtype.kind == "O":
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
        return _fill(name, arr, shape)
    wide = np.asarray(values)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"tensor '{name}': value out of range for {datatype}")
    return _fill(name, wide.astype(dtype.newbyteorder("="), copy=False), shape)



# ------------------------------------------------------------- Triton's extensions


def model_statistics(service: InferenceService, name: str = "", version: str = "") -> dict:
    """Triton's ``$stats_model_response``: every loaded version of every model, of ``name``,
    or one version (digits) or label of it."""
    if version and not name:
        raise InvalidArgument("a statistics request that names a version must name its model too")
    number, label = parse_version(version)
    return {"model_stats": [_model_stat(s) for s in service.statistics(name, number, label)]}


def _duration(d: Duration) -> dict:
    return {"count": d.count, "ns": d.ns}


# Graft has no response cache: Triton's cache statistics are reported, and are always zero.
_NO_CACHE = {"count": 0, "ns": 0}


def _model_stat(s: StatisticsSnapshot) -> dict:
    return {
        "name": s.name,
        "version": str(s.version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
            "cache_hit": dict(_NO_CACHE),
            "cache_miss": dict(_NO_CACHE),
        },
        "batch_stats": [{
            "batch_size": b.batch_size,
            "compute_input": _duration(b.compute_input),
            "compute_infer": _duration(b.compute_infer),
            "compute_output": _duration(b.compute_output),
        } for b in s.batches],
    }


# TF Serving's version states as Triton's repository index names them.
INDEX_STATES: Mapping[str, str] = {
    "START": "LOADING", "LOADING": "LOADING", "AVAILABLE": "READY", "UNLOADING": "UNLOADING", "END": "UNAVAILABLE",
}
READY = "READY"


def repository_index(service: InferenceService, ready: bool = False) -> list[dict]:
    """Triton's ``$repository_index_response``: one entry per version of every configured model
    (one without a version for a model that has none), only READY ones with ``ready``."""
    entries = [entry for model in service.repository_index() for entry in _index_entries(model)]
    return [e for e in entries if e["state"] == READY] if ready else entries


def _index_entries(model: RepositoryModel) -> list[dict]:
    if not model.versions:
        reason = "unloaded" if model.unloaded else "no complete version in its base path"
        return [{"name": model.name, "state": INDEX_STATES["END"], "reason": reason}]
    entries = []
    for status in model.versions:
        if status.error_code != "OK":
            reason = status.error_message or status.error_code
        else:
            reason = "unloaded" if status.state == "END" else ""
        entries.append({"name": model.name, "version": str(status.version),
                        "state": INDEX_STATES.get(status.state, INDEX_STATES["END"]), "reason": reason})
    return entries


UNLOAD_DEPENDENTS = "unload_dependents"


def load_model(service: InferenceService, name: str, parameters: Mapping[str, Any]) -> None:
    """A repository load: (re)load a model the server's config names. Triton's ``config`` and
    ``file:`` parameters would define a model from the request; they are refused."""
    for key in parameters:
        if key == "config" or key.startswith("file:"):
            raise InvalidArgument(
                f"load parameter '{key}' is not supported: graft-serve loads model '{name}' as its "
                "model config names it")
        raise InvalidArgument(f"unknown load parameter '{key}'")
    service.load_model(name)


def unload_model(service: InferenceService, name: str, parameters: Mapping[str, Any]) -> None:
    """A repository unload. ``unload_dependents`` is accepted and changes nothing: a Graft model
    has no dependent models."""
    for key, value in parameters.items():
        if key != UNLOAD_DEPENDENTS:
            raise InvalidArgument(f"unknown unload parameter '{key}'; expected: {UNLOAD_DEPENDENTS}")
        if not isinstance(value, bool):
            raise InvalidArgument(f"unload parameter '{UNLOAD_DEPENDENTS}' must be true or false")
    service.unload_model(name)


def model_config(service: InferenceService, name: str, version: str = "") -> dict:
    """Triton's ``$model_configuration_response`` (its ModelConfig as JSON) for the resolved
    version's ``serving_default`` signature.

    ``max_batch_size`` is the batcher's when batching runs for that signature, and then the
    batch dimension is left out of ``dims`` (Triton's rule); 0 otherwise, with full shapes.
    """
    number, label = parse_version(version)
    return model_config_json(service.model_description(name, number, label))


def model_config_json(description: ModelDescription) -> dict:
    """A ModelDescription as Triton's ModelConfig JSON (see :func:`model_config`)."""
    batching = description.batching
    max_batch_size = batching.max_batch_size if batching is not None else 0
    sig = description.signature
    config: dict[str, Any] = {
        "name": description.model,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": _policy_json(description.policy),
        "max_batch_size": max_batch_size,
        "input": [_config_tensor(t, max_batch_size > 0) for t in sig.inputs.values()] if sig else [],
        "output": [_config_tensor(t, max_batch_size > 0) for t in sig.outputs.values()] if sig else [],
    }
    if batching is not None:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(batching.allowed_batch_sizes),
            "max_queue_delay_microseconds": batching.batch_timeout_micros,
        }
    return config


def _policy_json(policy: VersionPolicy) -> dict:
    if policy.kind == "all":
        return {"all": {}}
    if policy.kind == "specific":
        return {"specific": {"versions": list(policy.versions)}}
    return {"latest": {"num_versions": policy.num_versions}}


def config_datatype(spec: TensorSpec) -> str:
    """Triton's ModelConfig data type of a tensor (``TYPE_FP32``; ``TYPE_STRING`` for BYTES)."""
    datatype = _TF_DATATYPES.get(spec.tf_dtype.as_datatype_enum)
    if datatype is None:
        return "TYPE_INVALID"
    return "TYPE_STRING" if datatype == BYTES else f"TYPE_{datatype}"


def _config_tensor(spec: TensorSpec, batched: bool) -> dict:
    # V2 cannot say "unknown rank"; one free dimension is the least wrong answer.
    dims = [-1] if spec.shape is None else [-1 if d is None else d for d in spec.shape]
    if batched and spec.shape is not None:
        dims = dims[1:]
    return {"name": spec.name, "data_type": config_datatype(spec), "dims": dims}
