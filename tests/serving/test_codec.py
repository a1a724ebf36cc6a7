"""Tests of serving.codecs: TF Serving JSON, TensorProto, tf.Example and image conversion.

Reference implementations are used wherever one exists: ``tf.make_ndarray`` and
``tf.make_tensor_proto`` for TensorProto, ``tf.io.parse_example`` for tf.Example,
Pillow-encoded images for the decoder.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.codecs import image, tensor_proto, tfs_json
from serving.errors import InvalidArgument
from serving.servable import SignatureSpec, TensorSpec


def _spec(name: str, dtype, shape) -> TensorSpec:
    tf_dtype = tf.as_dtype(dtype)
    np_dtype = np.dtype(object) if tf_dtype == tf.string else np.dtype(tf_dtype.as_numpy_dtype)
    return TensorSpec(name, np_dtype, tf_dtype, shape)


def _sig(**inputs) -> SignatureSpec:
    specs = {name: _spec(name, *dtype_shape) for name, dtype_shape in inputs.items()}
    return SignatureSpec("serving_default", "tensorflow/serving/predict", specs, {})


ONE = _sig(x=(tf.float32, (None, 2)))
TWO = _sig(x=(tf.float32, (None, 3)), tag=(tf.string, (None,)))


# ----------------------------------------------------------------------------- JSON


def test_parse_json_strict_and_non_finite():
    assert tfs_json.parse_json(b'{"a": [1, 2.5]}') == {"a": [1, 2.5]}
    body = tfs_json.parse_json(b'{"a": [NaN, Infinity, -Infinity]}')
    assert math.isnan(body["a"][0]) and body["a"][1:] == [math.inf, -math.inf]


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": }', b"[1, 2", b"\xff\xfe"])
def test_parse_json_rejects_bad_json(raw):
    with pytest.raises(InvalidArgument, match="JSON Parse error"):
        tfs_json.parse_json(raw)


def test_dump_json_writes_arrays_and_non_finite_like_tf_serving():
    arr = np.array([[0.1, 2.0], [3.5, -1.25]], dtype=np.float32)
    assert json.loads(tfs_json.dump_json({"o": arr})) == {"o": [[0.1, 2.0], [3.5, -1.25]]}
    raw = tfs_json.dump_json({"o": np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)})
    assert raw == b'{"o":[NaN,Infinity,-Infinity,1.0]}'
    # Python json parses it back, as TF Serving's clients do.
    back = json.loads(raw)["o"]
    assert math.isnan(back[0]) and back[1:] == [math.inf, -math.inf, 1.0]
    # Non-contiguous arrays and numpy scalars fall back to lists, not errors.
    assert json.loads(tfs_json.dump_json({"t": np.arange(6).reshape(2, 3).T, "s": np.int64(7)})) == {
        "t": [[0, 3], [1, 4], [2, 5]], "s": 7}


def test_float32_round_trips_through_json():
    arr = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    back = np.asarray(json.loads(tfs_json.dump_json({"o": arr}))["o"], dtype=np.float32)
    np.testing.assert_array_equal(back, arr)


# -------------------------------------------------------------------- predict decode


def test_row_format_single_input():
    inputs, row = tfs_json.decode_predict_json({"instances": [[1, 2], [3.5, 4]]}, ONE)
    assert row is True
    assert inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(inputs["x"], [[1, 2], [3.5, 4]])


def test_row_format_named_inputs_with_b64():
    body = {"instances": [
        {"x": [1, 2, 3], "tag": "ab"},
        {"x": [4, 5, 6], "tag": {"b64": base64.b64encode(b"\x00\xff").decode()}},
    ]}
    inputs, row = tfs_json.decode_predict_json(body, TWO)
    assert row is True
    np.testing.assert_array_equal(inputs["x"], [[1, 2, 3], [4, 5, 6]])
    assert inputs["tag"].dtype == object and inputs["tag"].tolist() == [b"ab", b"\x00\xff"]


def test_row_format_single_input_may_be_named():
    inputs, _ = tfs_json.decode_predict_json({"instances": [{"x": [1, 2]}, {"x": [3, 4]}]}, ONE)
    np.testing.assert_array_equal(inputs["x"], [[1, 2], [3, 4]])


def test_columnar_bare_and_named():
    inputs, row = tfs_json.decode_predict_json({"inputs": [[1, 2]]}, ONE)
    assert row is False and inputs["x"].shape == (1, 2)
    body = {"inputs": {"x": [[1, 2, 3], [4, 5, 6]], "tag": ["a", "b"]}}
    inputs, row = tfs_json.decode_predict_json(body, TWO)
    assert row is False and inputs["x"].shape == (2, 3) and inputs["tag"].tolist() == [b"a", b"b"]


def test_columnar_batch_sizes_may_differ():
    # The columnar format itself allows it; the service decides for batched inputs.
    body = {"inputs": {"x": [[1, 2, 3]], "tag": ["a", "b"]}}
    inputs, _ = tfs_json.decode_predict_json(body, TWO)
    assert inputs["x"].shape == (1, 3) and inputs["tag"].shape == (2,)


def test_dense_inputs_only_for_one_floating_point_input():
    values = np.arange(6.0).reshape(3, 2)
    inputs = tfs_json.dense_predict_inputs(values, ONE)
    assert inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(inputs["x"], values)
    half = tfs_json.dense_predict_inputs(values, _sig(x=(tf.float16, (None, 2))))
    assert half["x"].dtype == np.float16
    # Integer inputs need the JSON text's integer/fraction distinction; two inputs need names.
    assert tfs_json.dense_predict_inputs(values, _sig(x=(tf.int32, (None, 2)))) is None
    assert tfs_json.dense_predict_inputs(values, TWO) is None


def test_nan_and_infinity_inputs_are_accepted():
    body = tfs_json.parse_json(b'{"instances": [[NaN, Infinity], [-Infinity, 1]]}')
    inputs, _ = tfs_json.decode_predict_json(body, ONE)
    x = inputs["x"]
    assert np.isnan(x[0, 0]) and x[0, 1] == np.inf and x[1, 0] == -np.inf


@pytest.mark.parametrize("body, message", [
    ({"instances": [[1, 2]], "inputs": [[1, 2]]}, "expecting only one of 'inputs' or 'instances'"),
    ({"signature_name": "serving_default"}, "Missing 'inputs' or 'instances' key"),
    ({"instances": []}, "No values in 'instances'"),
    ({"instances": {"x": [1, 2]}}, "list/array"),
    ({"instances": [[1, 2], [3]]}, "input 'x': every instance must have the same shape"),
    ({"instances": [[1, 2], {"x": [1, 2]}]}, "mixes objects and plain values"),
    ({"instances": [["a", "b"]]}, None),  # strings for a float input: decoded, the service refuses
    ({"instances": [[True, False]]}, "input 'x'.*not of expected type: float32"),
    ({"instances": [[1, None]]}, "input 'x'"),
])
def test_predict_layout_errors_single_input(body, message):
    if message is None:
        inputs, _ = tfs_json.decode_predict_json(body, ONE)
        assert inputs["x"].dtype == object
        return
    with pytest.raises(InvalidArgument, match=message):
        tfs_json.decode_predict_json(body, ONE)


@pytest.mark.parametrize("body, message", [
    ({"instances": [[1, 2, 3]]}, "plain list, but expecting list of objects"),
    ({"instances": [{"x": [1, 2, 3]}]}, "missing input 'tag'"),
    ({"instances": [{"x": [1, 2, 3], "tag": "a", "z": 1}]}, "unknown input 'z'"),
    ({"instances": [{"x": [1, 2, 3], "tag": "a"}, [1]]}, "Expecting object but got list at item 1"),
    ({"instances": [{"x": [1, 2, 3], "tag": 5}]}, "input 'tag'.*not of expected type: string"),
    ({"instances": [{"x": [1, 2, 3], "tag": {"b64": "!!notbase64"}}]}, "Unable to base64 decode"),
    ({"inputs": [[1, 2, 3]]}, "plain value/list, but expecting an object"),
    ({"inputs": {"x": [[1, 2, 3]]}}, "Missing named input: tag"),
    ({"inputs": {"x": [[1, 2, 3]], "tag": ["a"], "q": [1]}}, "unknown input 'q'"),
    ({"inputs": {"x": [["a", 1]], "tag": ["a"]}}, "input 'x'"),
    ({"inputs": {"x": [[1, 2, 3]], "tag": [["a"], ["b", "c"]]}}, "input 'tag': lists have inconsistent sizes"),
])
def test_predict_layout_errors_two_inputs(body, message):
    with pytest.raises(InvalidArgument, match=message):
        tfs_json.decode_predict_json(body, TWO)


def test_integer_inputs_refuse_fractions_and_overflow():
    sig = _sig(n=(tf.int32, (None,)))
    inputs, _ = tfs_json.decode_predict_json({"inputs": [1, -2, 3]}, sig)
    assert inputs["n"].dtype == np.int32
    with pytest.raises(InvalidArgument, match="input 'n'.*int32"):
        tfs_json.decode_predict_json({"inputs": [1.5]}, sig)
    with pytest.raises(InvalidArgument, match="input 'n': value out of range"):
        tfs_json.decode_predict_json({"inputs": [2**40]}, sig)


def test_bool_and_string_inputs():
    sig = _sig(b=(tf.bool, (None,)), s=(tf.string, (None,)))
    inputs, _ = tfs_json.decode_predict_json({"inputs": {"b": [True, False], "s": ["é", "x"]}}, sig)
    assert inputs["b"].dtype == np.bool_ and inputs["b"].tolist() == [True, False]
    assert inputs["s"].tolist() == ["é".encode(), b"x"]
    with pytest.raises(InvalidArgument, match="input 'b'.*bool"):
        tfs_json.decode_predict_json({"inputs": {"b": [1], "s": ["x"]}}, sig)


# -------------------------------------------------------------------- predict encode


def test_encode_row_one_output_is_bare_list():
    out = tfs_json.encode_predict_json({"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}, True)
    assert json.loads(tfs_json.dump_json(out)) == {"predictions": [[1.0, 2.0], [3.0, 4.0]]}


def test_encode_row_several_outputs_is_list_of_objects_with_bytes_as_b64():
    out = tfs_json.encode_predict_json({
        "y": np.array([[1.0], [2.0]], np.float32),
        "label_bytes": np.array([b"a", b"\x00"], dtype=object),
        "name": np.array([b"cat", b"\xff"], dtype=object),
    }, True)
    assert json.loads(tfs_json.dump_json(out)) == {"predictions": [
        {"y": [1.0], "label_bytes": {"b64": "YQ=="}, "name": "cat"},
        {"y": [2.0], "label_bytes": {"b64": "AA=="}, "name": {"b64": "/w=="}},
    ]}


def test_encode_row_rejects_inconsistent_or_scalar_outputs():
    with pytest.raises(InvalidArgument, match="Tensor name: b has inconsistent batch size: 3 expecting: 2"):
        tfs_json.encode_predict_json({"a": np.zeros(2), "b": np.zeros(3)}, True)
    with pytest.raises(InvalidArgument, match="no shape information"):
        tfs_json.encode_predict_json({"a": np.float32(1.0)}, True)


def test_encode_columnar():
    one = tfs_json.encode_predict_json({"y": np.array([1, 2], np.int64)}, False)
    assert json.loads(tfs_json.dump_json(one)) == {"outputs": [1, 2]}
    several = tfs_json.encode_predict_json({"a": np.zeros(2), "s": np.array(b"z", dtype=object)}, False)
    assert json.loads(tfs_json.dump_json(several)) == {"outputs": {"a": [0.0, 0.0], "s": "z"}}


# ------------------------------------------------------------------------ examples


def test_examples_from_json_match_tf_parse_example():
    body = {
        "context": {"shared": 7},
        "examples": [
            {"x": [1.0, 2.5, -1.0], "name": "a", "raw": {"b64": "AAE="}, "flag": True},
            {"x": [0.0, 0.5, 3.0], "name": ["b", "c"], "raw": {"b64": "Ag=="}, "flag": False},
        ],
    }
    examples, context = tfs_json.examples_from_json(body)
    spec = {
        "x": tf.io.FixedLenFeature([3], tf.float32),
        "raw": tf.io.FixedLenFeature([], tf.string),
        "flag": tf.io.FixedLenFeature([], tf.int64),
        "name": tf.io.VarLenFeature(tf.string),
        "shared": tf.io.FixedLenFeature([], tf.int64),
    }
    # Context + example concatenated is how TF Serving merges the two protos.
    parsed = tf.io.parse_example([context + e for e in examples], spec)
    np.testing.assert_allclose(parsed["x"].numpy(), [[1.0, 2.5, -1.0], [0.0, 0.5, 3.0]])
    assert parsed["raw"].numpy().tolist() == [b"\x00\x01", b"\x02"]
    assert parsed["flag"].numpy().tolist() == [1, 0]
    assert parsed["shared"].numpy().tolist() == [7, 7]
    assert parsed["name"].values.numpy().tolist() == [b"a", b"b", b"c"]


@pytest.mark.parametrize("body, message", [
    ({"instances": []}, "'examples' is expected"),
    ({"examples": {}}, "list/array"),
    ({"examples": []}, "empty array"),
    ({"examples": [[1]]}, "Example must be JSON object"),
    ({"examples": [{"x": [1, 2.5]}]}, "Unexpected element type in feature: x expecting type: int64"),
    ({"examples": [{"x": [[1]]}]}, "Feature: x has element with unexpected JSON type"),
    ({"examples": [{"x": None}]}, "Feature: x"),
    ({"examples": [{"x": 2**64}]}, "out of int64 range"),
])
def test_examples_from_json_errors(body, message):
    with pytest.raises(InvalidArgument, match=message):
        tfs_json.examples_from_json(body)


# --------------------------------------------------------------------- TensorProto

_NUMERIC = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
            np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_NUMERIC).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))))
def test_tensor_content_round_trip_matches_tensorflow(arr):
    ours = tensor_proto.numpy_to_tensor_proto(arr)
    np.testing.assert_array_equal(tf.make_ndarray(ours), arr)
    back = tensor_proto.tensor_proto_to_numpy(tf.make_tensor_proto(arr), max_elements=10**6)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("dtype", _NUMERIC)
def test_typed_value_fields_match_tensorflow(dtype):
    arr = (np.arange(6) % 2 == 0) if dtype is np.bool_ else np.arange(6).astype(dtype)
    arr = arr.reshape(2, 3)
    tp = tf.make_tensor_proto(arr)
    # Re-express as value fields (what many clients send) instead of tensor_content.
    typed = tensor_pb2.TensorProto(dtype=tp.dtype, tensor_shape=tp.tensor_shape)
    field = tensor_proto._DTYPES[tp.dtype][1]
    values = arr.view(np.uint16).reshape(-1) if dtype is np.float16 else arr.reshape(-1)
    getattr(typed, field).extend(values.tolist())
    np.testing.assert_array_equal(tensor_proto.tensor_proto_to_numpy(typed, max_elements=100),
                                  tf.make_ndarray(typed))


def test_fewer_values_repeat_the_last_like_tensorflow():
    tp = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0])
    tp.tensor_shape.dim.add().size = 4
    np.testing.assert_array_equal(tensor_proto.tensor_proto_to_numpy(tp, max_elements=10), [1, 2, 2, 2])
    empty = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64)
    empty.tensor_shape.dim.add().size = 3
    np.testing.assert_array_equal(tensor_proto.tensor_proto_to_numpy(empty, max_elements=10), [0, 0, 0])


def test_string_tensor_round_trip():
    arr = np.array([[b"a", b"\x00\xff"], [b"", b"long" * 10]], dtype=object)
    tp = tensor_proto.numpy_to_tensor_proto(arr)
    assert tp.dtype == types_pb2.DT_STRING
    assert tf.make_ndarray(tp).tolist() == arr.tolist()
    back = tensor_proto.tensor_proto_to_numpy(tf.make_tensor_proto(arr), max_elements=10)
    assert back.dtype == object and back.tolist() == arr.tolist()


def _proto(dtype, shape, **fields) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        tp.tensor_shape.dim.add().size = size
    return tp


@pytest.mark.parametrize("tp, message", [
    (_proto(types_pb2.DT_FLOAT, [2, 2], tensor_content=b"\x00" * 12), "holds 12 bytes .* needs 16"),
    (_proto(types_pb2.DT_FLOAT, [2, -1]), "negative dimension"),
    (_proto(types_pb2.DT_COMPLEX64, [1]), "unsupported tensor dtype DT_COMPLEX64"),
    (_proto(types_pb2.DT_RESOURCE, [1]), "unsupported tensor dtype DT_RESOURCE"),
    (_proto(types_pb2.DT_FLOAT, [1], float_val=[1.0, 2.0]), "2 values but shape \\[1\\]"),
    (_proto(types_pb2.DT_FLOAT, [1000, 1000]), "exceeds the limit of 1000"),
    (_proto(types_pb2.DT_STRING, [1], tensor_content=b"abcd"), "string_val"),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                            tensor_shape={"unknown_rank": True}), "unknown rank"),
])
def test_bad_tensor_protos(tp, message):
    with pytest.raises(InvalidArgument, match=message):
        tensor_proto.tensor_proto_to_numpy(tp, max_elements=1000)


# -------------------------------------------------------------------------- images


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_png_exact_at_target_size():
    pixels = np.random.default_rng(2).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    out = image.decode_image(_encode(Image.fromarray(pixels), "PNG"), 8, 6, max_pixels=10**6)
    assert out.dtype == np.float32 and out.shape == (8, 6, 3)
    np.testing.assert_array_equal(out, pixels.astype(np.float32))


def test_decode_resizes_and_converts_to_rgb():
    gray = Image.fromarray(np.full((40, 50), 200, dtype=np.uint8), mode="L")
    out = image.decode_image(_encode(gray, "JPEG"), 16, 20, max_pixels=10**6)
    assert out.shape == (16, 20, 3)
    assert np.abs(out - 200).max() <= 2  # JPEG rounding only
    rgba = Image.new("RGBA", (10, 10), (10, 20, 30, 128))
    out = image.decode_image(_encode(rgba, "PNG"), 5, 5, max_pixels=10**6)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])


def test_decode_refuses_too_many_pixels_before_decoding():
    # A 4000x4000 one-colour PNG is a few KB: the classic decompression bomb shape.
    bomb = _encode(Image.new("RGB", (4000, 4000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidArgument, match="16000000 pixels exceeds the limit of 1000000"):
        image.decode_image(bomb, 32, 32, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_decode_refuses_non_images(data):
    with pytest.raises(InvalidArgument, match="image"):
        image.decode_image(data, 8, 8, max_pixels=10**6)


def test_decode_refuses_truncated_image():
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(pixels), "PNG")
    with pytest.raises(InvalidArgument, match="image"):
        image.decode_image(data[: len(data) // 2], 8, 8, max_pixels=10**6)


def test_check_image_pixels_reads_headers_only():
    def encoded(image, fmt, **save):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **save)
        return buf.getvalue()

    image.check_image_pixels(encoded(Image.new("RGB", (10, 10)), "JPEG"), 100)  # at the limit
    with pytest.raises(InvalidArgument, match="image of 11x10 = 110 pixels exceeds the limit of 100"):
        image.check_image_pixels(encoded(Image.new("RGB", (11, 10)), "PNG"), 100)
    # 400 million pixels in 49 KB: refused from the header, nothing decoded.
    bomb = encoded(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidArgument, match="exceeds the limit of 1000000 pixels"):
        image.check_image_pixels(bomb, 1_000_000)
    frames = [Image.new("L", (10, 10), i * 20) for i in range(3)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidArgument, match="10x10x3 frames = 300 pixels"):
        image.check_image_pixels(gif, 299)
    for not_an_image in (b"", b"text", b"\x89PNG\r\n\x1a\n truncated"):
        image.check_image_pixels(not_an_image, 1)
