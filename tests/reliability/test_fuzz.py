"""Fuzz targets for the wire codecs: only ServingError may escape, whatever the input.

Hypothesis drives ``serving.codecs`` with arbitrary JSON-ish values and bytes (the
REST JSON codec), arbitrary TensorProtos (the gRPC tensor codec) and damaged
images. A bug shows up as any exception other than a ``ServingError`` subclass
(those become a 4xx / INVALID_ARGUMENT; anything else would be a 500). Each
target runs a bounded number of examples so the file stays fast in CI.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.codecs import image, tensor_proto, tfs_json
from serving.errors import ServingError
from serving.servable import SignatureSpec, TensorSpec

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)
MAX_ELEMENTS = 4096


def _spec(name: str, dtype: tf.DType, shape) -> TensorSpec:
    np_dtype = np.dtype(object) if dtype == tf.string else np.dtype(dtype.as_numpy_dtype)
    return TensorSpec(name, np_dtype, dtype, shape)


def _signature(**inputs) -> SignatureSpec:
    specs = {name: _spec(name, dtype, shape) for name, (dtype, shape) in inputs.items()}
    return SignatureSpec("serving_default", "tensorflow/serving/predict", specs, {})


# Every dtype a signature can have over JSON, one input and several.
SIGNATURES = [
    _signature(x=(tf.float32, (None, 3))),
    _signature(x=(tf.float32, (None, 3)), tag=(tf.string, (None,))),
    _signature(images=(tf.float32, (None, 4, 4, 3))),
    _signature(b=(tf.bool, (None,)), i=(tf.int8, (None, 2)), u=(tf.uint8, None)),
    _signature(h=(tf.float16, None), d=(tf.float64, (None,)), q=(tf.int64, ())),
    _signature(c=(tf.complex64, (None,))),
]
NAMES = ["x", "tag", "images", "b", "i", "u", "h", "d", "q", "c", "b64", "instances", "inputs",
         "signature_name", "examples", "context"]

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=8) | st.sampled_from(["YQ==", "not base64!", "", "\x00"]))
json_values = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=5)
                   | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=4), inner, max_size=4)
                   | inner.map(lambda v: {"b64": v})),
    max_leaves=40)
bodies = st.fixed_dictionaries({}, optional={
    "instances": json_values, "inputs": json_values, "signature_name": json_values,
    "output_filter": json_values, "examples": json_values, "context": json_values,
})


def _only_serving_errors(call, *args, **kwargs):
    """Run ``call``; a ServingError is an accepted outcome, anything else fails the test."""
    try:
        return call(*args, **kwargs)
    except ServingError as err:
        assert err.message, "a ServingError must say what is wrong"
        return None


# ----------------------------------------------------------------------- REST JSON


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(raw=b"[" * 5000)
@example(raw=b'{"a": 1e999, "b": -Infinity, "c": NaN}')
@example(raw=b"\xef\xbb\xbf{}")
def test_parse_json_on_arbitrary_bytes(raw):
    _only_serving_errors(tfs_json.parse_json, raw)


@FUZZ
@given(body=bodies, signature=st.sampled_from(SIGNATURES))
def test_decode_predict_json_on_arbitrary_bodies(body, signature):
    decoded = _only_serving_errors(tfs_json.decode_predict_json, body, signature)
    if decoded is not None:
        inputs, _ = decoded
        assert set(inputs) == set(signature.inputs)
        for name, arr in inputs.items():
            assert isinstance(arr, np.ndarray)
            # Strings may stand for encoded images; otherwise the signature's dtype.
            assert arr.dtype == signature.inputs[name].dtype or arr.dtype == object


@FUZZ
@given(body=bodies)
def test_examples_from_json_on_arbitrary_bodies(body):
    _only_serving_errors(tfs_json.examples_from_json, body)


@FUZZ
@given(text=st.text(max_size=300), signature=st.sampled_from(SIGNATURES))
def test_rest_body_text_through_parse_and_decode(text, signature):
    # The REST adapter's order: bytes -> parse_json -> an object -> decode against the signature.
    body = _only_serving_errors(tfs_json.parse_json, text.encode("utf-8", "surrogatepass"))
    if isinstance(body, dict):
        _only_serving_errors(tfs_json.decode_predict_json, body, signature)


def _nested(depth: int, leaf) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("leaf", [1.0, "a", {"b64": "YQ=="}, {"k": 1}, None])
@pytest.mark.parametrize("depth", [65, 900, 1020])
def test_deeply_nested_values_are_invalid_argument(depth, leaf):
    # orjson parses up to 1024 levels; every later step must refuse (not recurse into) them.
    # Built as text: json.dumps itself would hit the recursion limit at this depth.
    raw = '{"inputs": {"x": ' + "[" * depth + json.dumps(leaf) + "]" * depth + ', "tag": ["a"]}}'
    body = tfs_json.parse_json(raw.encode())
    with pytest.raises(ServingError):
        tfs_json.decode_predict_json(body, SIGNATURES[1])
    with pytest.raises(ServingError):
        tfs_json.examples_from_json({"examples": [{"f": _nested(depth, leaf)}]})
    with pytest.raises(ServingError):
        tfs_json.examples_from_json({"examples": [{"f": [_nested(depth, {"b64": 1})]}]})


# --------------------------------------------------------------------- TensorProto

ALL_DTYPES = sorted(types_pb2.DataType.values())
# The value field TensorFlow reads for each dtype the codec supports (tensor.proto).
VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val", types_pb2.DT_HALF: "half_val",
    types_pb2.DT_INT8: "int_val", types_pb2.DT_INT16: "int_val", types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val", types_pb2.DT_UINT16: "int_val", types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val", types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
}
_ints = st.integers(-(2**63), 2**63 - 1)


@st.composite
def tensor_protos(draw) -> tensor_pb2.TensorProto:
    """TensorProtos with any dtype, shape and mix of value fields, consistent or not."""
    # Mostly dtypes the codec supports, so that the value paths are reached, not just refused.
    dtype = draw(st.sampled_from(sorted(VALUE_FIELDS)) | st.sampled_from(ALL_DTYPES) | st.integers(-5, 400))
    tp = tensor_pb2.TensorProto(dtype=dtype)
    if draw(st.booleans()):
        tp.tensor_shape.unknown_rank = True
    for size in draw(st.lists(st.integers(-3, 12) | st.sampled_from([2**31, 2**62]), max_size=4)):
        tp.tensor_shape.dim.add().size = size
    field = draw(st.sampled_from(["tensor_content", "float_val", "double_val", "half_val", "int_val",
                                  "int64_val", "uint32_val", "uint64_val", "bool_val", "string_val",
                                  "none", "own", "own"]))
    if field == "own":
        field = VALUE_FIELDS.get(dtype, "tensor_content")
    if field == "tensor_content":
        tp.tensor_content = draw(st.binary(max_size=64))
    elif field in ("float_val", "double_val"):
        getattr(tp, field).extend(draw(st.lists(st.floats(allow_nan=True, width=32), max_size=16)))
    elif field in ("half_val", "int_val"):
        getattr(tp, field).extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=16)))
    elif field == "int64_val":
        tp.int64_val.extend(draw(st.lists(_ints, max_size=16)))
    elif field == "uint32_val":
        tp.uint32_val.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=16)))
    elif field == "uint64_val":
        tp.uint64_val.extend(draw(st.lists(st.integers(0, 2**64 - 1), max_size=16)))
    elif field == "bool_val":
        tp.bool_val.extend(draw(st.lists(st.booleans(), max_size=16)))
    elif field == "string_val":
        tp.string_val.extend(draw(st.lists(st.binary(max_size=8), max_size=16)))
    return tp


def _check_tensor(tp: tensor_pb2.TensorProto) -> None:
    arr = _only_serving_errors(tensor_proto.tensor_proto_to_numpy, tp, max_elements=MAX_ELEMENTS)
    if arr is None:
        return
    assert isinstance(arr, np.ndarray)
    assert arr.shape == tuple(d.size for d in tp.tensor_shape.dim)
    assert arr.size <= MAX_ELEMENTS
    # Whatever was accepted must round-trip, so the response path cannot fail on it either.
    back = tensor_proto.tensor_proto_to_numpy(tensor_proto.numpy_to_tensor_proto(arr), max_elements=MAX_ELEMENTS)
    assert back.shape == arr.shape and back.dtype == arr.dtype


def _proto(dtype: int, shape, **fields) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        tp.tensor_shape.dim.add().size = size
    return tp


@FUZZ
@given(tp=tensor_protos())
# Found by this target: numpy cannot shape an empty tensor whose other dimensions overflow.
@example(tp=_proto(types_pb2.DT_FLOAT, [0, 2**62, 2**62]))
@example(tp=_proto(types_pb2.DT_STRING, [2**31, 0, 2**31, 2**31]))
# Out-of-range values in narrow integer types wrap, as TensorFlow's FromProto casts them.
@example(tp=_proto(types_pb2.DT_INT8, [3], int_val=[1000, -1000]))
@example(tp=_proto(types_pb2.DT_HALF, [2], half_val=[70000, -5]))
def test_tensor_proto_to_numpy_on_arbitrary_protos(tp):
    _check_tensor(tp)


@FUZZ
@given(raw=st.binary(max_size=120))
def test_tensor_proto_to_numpy_on_arbitrary_wire_bytes(raw):
    tp = tensor_pb2.TensorProto()
    try:
        tp.ParseFromString(raw)
    except Exception:  # protobuf's DecodeError: grpc itself would refuse such a message
        return
    _check_tensor(tp)


# -------------------------------------------------------------------------- images


def _image_bytes(fmt: str) -> bytes:
    pixels = np.random.default_rng(11).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = {fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@pytest.mark.filterwarnings("ignore::UserWarning")   # Pillow warns about the damage it tolerates
@FUZZ
@given(data=st.sampled_from(sorted(SEEDS)).flatmap(
    lambda fmt: st.tuples(st.just(SEEDS[fmt]), st.integers(0, len(SEEDS[fmt])),
                          st.lists(st.tuples(st.integers(0, len(SEEDS[fmt]) - 1), st.integers(0, 255)),
                                   max_size=6))))
def test_decode_image_on_damaged_images(data):
    original, cut, flips = data
    damaged = bytearray(original[:cut])
    for position, value in flips:
        if position < len(damaged):
            damaged[position] = value
    out = _only_serving_errors(image.decode_image, bytes(damaged), 8, 8, max_pixels=10_000)
    if out is not None:
        assert out.shape == (8, 8, 3) and out.dtype == np.float32
