"""TF Serving's REST JSON <-> numpy: predict bodies (row and columnar), answers, tf.Examples.

Everything here is a pure function of its arguments and raises ``InvalidArgument``
(naming the offending input) on bad content. Numeric data never goes through
per-element Python loops: JSON lists become arrays with one ``np.asarray`` call.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from tensorflow.core.example import example_pb2, feature_pb2

from serving.errors import InvalidArgument

if TYPE_CHECKING:
    from serving.servable import SignatureSpec

B64_KEY = "b64"
BYTES_SUFFIX = "_bytes"
# The deepest JSON tensor accepted: numpy iterates object arrays of at most 32 dimensions,
# and refusing deeper nesting up front keeps recursion bounded on hostile input.
MAX_JSON_RANK = 32


def parse_json(raw: bytes | str) -> Any:
    """Parse a request body: orjson for strict JSON, Python's json for NaN/Infinity."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        # The slow path exists only because TF Serving accepts NaN and Infinity.
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"JSON Parse error: {exc}") from None


def dump_json(obj: Any) -> bytes:
    """Serialize a response; numpy arrays are written natively; NaN/Infinity as TF Serving does."""
    if _all_finite(obj):
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=_to_list)
    # orjson would turn NaN into null; TF Serving writes NaN / Infinity / -Infinity.
    return json.dumps(obj, default=_to_list, allow_nan=True, separators=(",", ":")).encode()


def _to_list(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _all_finite(obj: Any) -> bool:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.dtype.kind not in "fc" or bool(np.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, Mapping):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_all_finite(v) for v in obj)
    return True


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(B64_KEY), str)


def _b64decode(text: str) -> bytes:
    try:
        # Clients often drop the padding; TF Serving's absl decoder tolerates that too.
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("Unable to base64 decode") from None


def _first_leaf(value: Any) -> tuple[Any, int]:
    """The first scalar of a nested list, and how many lists deep it is."""
    depth = 0
    while isinstance(value, list) and value:
        value = value[0]
        depth += 1
    return value, depth


def _too_deep(name: str) -> InvalidArgument:
    return InvalidArgument(f"input '{name}': lists are nested more than {MAX_JSON_RANK} deep")


def _strings(value: Any, name: str, depth: int = 0) -> Any:
    """Nested JSON lists of str / {"b64"} -> nested lists of bytes (strings are never bulk data)."""
    if isinstance(value, list):
        if depth >= MAX_JSON_RANK:
            raise _too_deep(name)
        return [_strings(v, name, depth + 1) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    if _is_b64(value):
        return _b64decode(value[B64_KEY])
    raise InvalidArgument(
        f"input '{name}': JSON value {_short(value)} is not of expected type: string"
    )


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True) if not isinstance(value, bytes) else repr(value)
    except (RecursionError, TypeError, ValueError):  # hostile nesting: name the type only
        text = type(value).__name__
    return text if len(text) <= 64 else text[:61] + "..."


def json_to_array(value: Any, dtype: np.dtype, name: str) -> np.ndarray:
    """One JSON tensor (nested lists) -> ndarray of ``dtype``.

    String data (plain or ``{"b64"}``) becomes an object array of bytes whatever
    ``dtype`` is, so that the service can offer encoded images for float inputs and
    report a dtype mismatch naming the input otherwise.
    """
    leaf, depth = _first_leaf(value)
    if depth > MAX_JSON_RANK:
        raise _too_deep(name)
    if isinstance(leaf, str | dict):
        try:
            arr = np.array(_strings(value, name), dtype=object)
        except ValueError:
            arr = None
        # With dtype=object numpy keeps ragged sub-lists as elements instead of failing.
        if arr is None or any(isinstance(v, list) for v in arr.flat):
            raise InvalidArgument(f"input '{name}': lists have inconsistent sizes")
        return arr
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"input '{name}': lists have inconsistent sizes or mixed types"
        ) from None
    return _cast(arr, np.dtype(dtype), name)


def _cast(arr: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    kind = arr.dtype.kind
    want = dtype.kind
    if arr.size == 0:
        return arr.astype(dtype if want != "O" else object)
    if want == "O":
        raise InvalidArgument(
            f"input '{name}': JSON values of type {_json_kind(kind)} are not of expected type: string"
        )
    if want == "f":
        if kind not in "iuf":
            raise InvalidArgument(
                f"input '{name}': JSON values of type {_json_kind(kind)} are not of expected type: {dtype.name}"
            )
        return arr.astype(dtype, copy=False)
    if want in "iu":
        if kind not in "iu":
            raise InvalidArgument(
                f"input '{name}': JSON values of type {_json_kind(kind)} are not of expected type: {dtype.name}"
            )
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidArgument(f"input '{name}': value out of range for {dtype.name}")
        return arr.astype(dtype, copy=False)
    if want == "b":
        if kind != "b":
            raise InvalidArgument(
                f"input '{name}': JSON values of type {_json_kind(kind)} are not of expected type: bool"
            )
        return arr
    raise InvalidArgument(f"input '{name}': dtype {dtype.name} is not supported over JSON")


def _json_kind(kind: str) -> str:
    return {"i": "integer", "u": "integer", "f": "number", "b": "bool", "U": "string"}.get(
        kind, "mixed or null"
    )


def decode_predict_json(
    body: Mapping[str, Any], signature: SignatureSpec
) -> tuple[dict[str, np.ndarray], bool]:
    """A TF Serving predict body -> (inputs, row_format), converted to the signature's dtypes.

    Validates the layout (instances vs inputs, named objects, equal instance shapes);
    the service validates ranks, fixed dimensions and batch agreement afterwards.
    """
    row_format = predict_json_format(body)
    specs = signature.inputs
    if not specs:
        raise InvalidArgument(f"Failed to get input map for signature: {signature.name}")
    if row_format:
        return _decode_rows(body["instances"], specs), True
    return _decode_columns(body["inputs"], specs), False


def dense_predict_inputs(values: np.ndarray, signature: SignatureSpec) -> dict[str, np.ndarray] | None:
    """Inputs from a numeric array read by ``serving.codecs.dense_json`` (float64, any shape), or None.

    Only a signature with one floating-point input takes it as it is: there the
    general path would also have produced this array, whether it came as
    ``instances`` (rows of the one input) or ``inputs``. Other signatures need the
    integer/float distinction of the JSON text, so the caller parses it in full.
    """
    if len(signature.inputs) != 1:
        return None
    (name, spec), = signature.inputs.items()
    dtype = np.dtype(spec.dtype)
    if dtype.kind != "f":
        return None
    return {name: values.astype(dtype)}


def predict_json_format(body: Mapping[str, Any]) -> bool:
    """True for the row format (``instances``), False for columnar (``inputs``)."""
    has_instances = "instances" in body
    has_inputs = "inputs" in body
    if has_instances and has_inputs:
        raise InvalidArgument(
            "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"
        )
    if not has_instances and not has_inputs:
        raise InvalidArgument("Missing 'inputs' or 'instances' key")
    return has_instances


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _decode_rows(instances: Any, specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise InvalidArgument("Expecting 'instances' to be an list/array")
    if not instances:
        raise InvalidArgument("No values in 'instances' array")
    if not _is_named(instances[0]):
        if len(specs) > 1:
            raise InvalidArgument(
                "instances is a plain list, but expecting list of objects as multiple "
                f"input tensors required: {', '.join(sorted(specs))}"
            )
        if any(_is_named(item) for item in instances):
            raise InvalidArgument("'instances' mixes objects and plain values")
        (name, spec), = specs.items()
        return {name: _stack_rows(instances, spec.dtype, name)}
    names = set(specs)
    columns: dict[str, list] = {name: [] for name in specs}
    for index, item in enumerate(instances):
        if not _is_named(item):
            raise InvalidArgument(f"Expecting object but got list at item {index} of 'instances'")
        if item.keys() != names:
            extra = sorted(set(item) - names)
            missing = sorted(names - set(item))
            what = f"unknown input '{extra[0]}'" if extra else f"missing input '{missing[0]}'"
            raise InvalidArgument(
                f"{what} in item {index} of 'instances'; keys must be: {', '.join(sorted(names))}"
            )
        for name, value in item.items():
            columns[name].append(value)
    return {name: _stack_rows(rows, specs[name].dtype, name) for name, rows in columns.items()}


def _stack_rows(rows: list, dtype: np.dtype, name: str) -> np.ndarray:
    try:
        return json_to_array(rows, dtype, name)
    except InvalidArgument as exc:
        if "inconsistent sizes" in exc.message:
            raise InvalidArgument(
                f"input '{name}': every instance must have the same shape"
            ) from None
        raise


def _decode_columns(inputs: Any, specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not _is_named(inputs):
        if len(specs) > 1:
            raise InvalidArgument(
                "inputs is a plain value/list, but expecting an object as multiple input "
                f"tensors required: {', '.join(sorted(specs))}"
            )
        (name, spec), = specs.items()
        return {name: json_to_array(inputs, spec.dtype, name)}
    for name in inputs:
        if name not in specs:
            raise InvalidArgument(
                f"unknown input '{name}' in 'inputs' object; expected: {', '.join(sorted(specs))}"
            )
    for name in specs:
        if name not in inputs:
            raise InvalidArgument(f"Missing named input: {name} in 'inputs' object.")
    return {name: json_to_array(inputs[name], spec.dtype, name) for name, spec in specs.items()}


def encode_predict_json(outputs: Mapping[str, np.ndarray], row_format: bool) -> dict:
    """Outputs -> ``{"predictions": ...}`` (row request) or ``{"outputs": ...}`` (columnar).

    Numeric arrays stay arrays (``dump_json`` writes them natively); string outputs
    become str, or ``{"b64"}`` when the alias ends in ``_bytes`` or is not UTF-8.
    """
    if not outputs:
        raise InvalidArgument("Cannot convert empty tensor map to JSON")
    values = {name: _json_value(name, np.asarray(arr)) for name, arr in outputs.items()}
    if not row_format:
        if len(values) == 1:
            return {"outputs": next(iter(values.values()))}
        return {"outputs": values}
    batch = None
    for name, arr in outputs.items():
        shape = np.shape(arr)
        if not shape:
            raise InvalidArgument(f"Tensor name: {name} has no shape information ")
        if batch is not None and shape[0] != batch:
            raise InvalidArgument(
                f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}"
            )
        batch = shape[0]
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    return {
        "predictions": [{name: value[i] for name, value in values.items()} for i in range(batch)]
    }


def _json_value(name: str, arr: np.ndarray) -> Any:
    if arr.dtype.kind not in "OSU":
        return arr
    as_b64 = name.endswith(BYTES_SUFFIX)
    flat = [_string_out(v, as_b64) for v in arr.reshape(-1).tolist()]
    return np.array(flat, dtype=object).reshape(arr.shape).tolist() if arr.ndim else flat[0]


def _string_out(value: Any, as_b64: bool) -> Any:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not as_b64:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass  # not text: b64 keeps the JSON valid and the bytes intact
    return {B64_KEY: base64.b64encode(value).decode("ascii")}


# --------------------------------------------------------------------- tf.Example


def examples_from_json(body: Mapping[str, Any]) -> tuple[list[bytes], bytes | None]:
    """A REST classify/regress body -> (serialized tf.Example list, serialized context or None)."""
    context = None
    if "context" in body:
        context = _example_from_json(body["context"], "context").SerializeToString()
    if "examples" not in body:
        raise InvalidArgument("key 'examples' is expected and was not found")
    examples = body["examples"]
    if not isinstance(examples, list):
        raise InvalidArgument("Expecting 'examples' value to be an list/array")
    if not examples:
        raise InvalidArgument("'examples' value is an empty array")
    return [
        _example_from_json(item, f"examples[{i}]").SerializeToString()
        for i, item in enumerate(examples)
    ], context


def _example_from_json(obj: Any, where: str) -> example_pb2.Example:
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: Example must be JSON object")
    example = example_pb2.Example()
    for name, content in obj.items():
        feature = example.features.feature[name]
        for value in content if isinstance(content, list) else [content]:
            _add_feature_value(feature, name, value)
    return example


def _add_feature_value(feature: feature_pb2.Feature, name: str, value: Any) -> None:
    # Kinds follow TF Serving: bool and int -> int64_list, float -> float_list,
    # str and {"b64"} -> bytes_list; one feature cannot mix kinds.
    if isinstance(value, bool) or isinstance(value, int):
        kind, item = "int64_list", int(value)
        if not -(2**63) <= item < 2**63:
            raise InvalidArgument(f"Feature: {name} has an element out of int64 range")
    elif isinstance(value, float):
        kind, item = "float_list", value
    elif isinstance(value, str):
        kind, item = "bytes_list", value.encode("utf-8")
    elif _is_b64(value):
        kind, item = "bytes_list", _b64decode(value[B64_KEY])
    else:
        raise InvalidArgument(f"Feature: {name} has element with unexpected JSON type: {_short(value)}")
    current = feature.WhichOneof("kind")
    if current not in (None, kind):
        raise InvalidArgument(
            f"Unexpected element type in feature: {name} expecting type: {current.split('_')[0]}"
        )
    getattr(feature, kind).value.append(item)
