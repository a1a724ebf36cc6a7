"""Bad gRPC input against a real graft-serve, through tensorflow-serving-api's stubs.

Every malformed request gets INVALID_ARGUMENT with a message naming the problem
(RESOURCE_EXHAUSTED for an oversize message), never INTERNAL or UNKNOWN, and the
server answers a good request correctly right afterwards. Cases already in
tests/serving/test_grpc.py (short tensor_content, unknown or missing input,
wrong dtype or shape, ...) are not repeated.
"""

from __future__ import annotations

import io
import re
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from tests import models
from tests.serving.server import serving

MAX_BYTES = 1_000_000
X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
TAGS = np.array([b"a", b"bc"], dtype=object)
PREDICT = "/tensorflow.serving.PredictionService/Predict"


@pytest.fixture(scope="module")
def client(cnn_and_two_repo):
    """A Client of one in-process graft-serve serving cnn/1 and two/1 (label stable -> 1)."""
    config = cnn_and_two_repo("grpc_input_repo")
    with serving(model_config_file=str(config), max_request_bytes=MAX_BYTES, max_image_pixels=64 * 64,
                 file_system_poll_wait_seconds=0) as (_, handle):
        yield handle


def _proto(dtype: int, shape, **fields) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        tp.tensor_shape.dim.add().size = size
    return tp


def _request(model="two", inputs=None, **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    if inputs is None:
        inputs = {"x": X, "tag": TAGS}
    for name, value in inputs.items():
        proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        request.inputs[name].CopyFrom(proto)
    return request


def _error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def assert_still_serving(client) -> None:
    """A good Predict gets the right answer: the server survived what came before."""
    response = client.predict.Predict(_request(), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), models.two_input_expected(X), atol=1e-5)


def _image(fmt: str, size=(32, 32)) -> bytes:
    pixels = np.random.default_rng(5).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _images(*data: bytes) -> dict:
    return {"images": np.array(list(data), dtype=object)}


def _with_tag(x) -> dict:
    return {"x": x, "tag": TAGS}


JPEG = _image("JPEG")
PNG = _image("PNG")
FLOAT = types_pb2.DT_FLOAT

# (id, request, regex the details must match); every one is INVALID_ARGUMENT.
INVALID = [
    ("content longer than shape", _request(inputs=_with_tag(_proto(FLOAT, [2, 3], tensor_content=b"\0" * 28))),
     "input 'x': tensor_content holds 28 bytes but shape \\[2, 3\\] of float32 needs 24"),
    ("content for a zero-size shape", _request(inputs=_with_tag(_proto(FLOAT, [0, 3], tensor_content=b"\0" * 4))),
     "input 'x': tensor_content holds 4 bytes"),
    ("string content", _request(inputs={"x": X, "tag": _proto(types_pb2.DT_STRING, [2], tensor_content=b"ab")}),
     "input 'tag': DT_STRING tensors must use string_val"),
    ("more values than shape", _request(inputs=_with_tag(_proto(FLOAT, [1, 3], float_val=[1, 2, 3, 4]))),
     "input 'x': tensor has 4 values but shape \\[1, 3\\] holds 3"),
    ("complex64", _request(inputs=_with_tag(_proto(types_pb2.DT_COMPLEX64, [2, 3]))),
     "input 'x': unsupported tensor dtype DT_COMPLEX64"),
    ("bfloat16", _request(inputs=_with_tag(_proto(types_pb2.DT_BFLOAT16, [2, 3]))),
     "input 'x': unsupported tensor dtype DT_BFLOAT16"),
    ("resource", _request(inputs=_with_tag(_proto(types_pb2.DT_RESOURCE, [1]))),
     "input 'x': unsupported tensor dtype DT_RESOURCE"),
    ("variant", _request(inputs=_with_tag(_proto(types_pb2.DT_VARIANT, [1]))),
     "input 'x': unsupported tensor dtype DT_VARIANT"),
    ("quantized", _request(inputs=_with_tag(_proto(types_pb2.DT_QINT8, [2, 3]))),
     "input 'x': unsupported tensor dtype DT_QINT8"),
    ("invalid dtype", _request(inputs=_with_tag(_proto(0, [2, 3]))), "input 'x': unsupported tensor dtype DT_INVALID"),
    ("unknown dtype number", _request(inputs=_with_tag(_proto(999, [2, 3]))), "input 'x': unknown tensor dtype 999"),
    ("negative dimension", _request(inputs=_with_tag(_proto(FLOAT, [-1, 3], float_val=[1, 2, 3])))
     , "input 'x': tensor shape \\[-1, 3\\] has a negative dimension"),
    ("negative dimension in the middle", _request(inputs=_with_tag(_proto(FLOAT, [2, -3]))),
     "negative dimension"),
    ("unknown rank", _request(inputs=_with_tag(tensor_pb2.TensorProto(dtype=FLOAT,
                                                                         tensor_shape={"unknown_rank": True}))),
     "input 'x': tensor shape has unknown rank"),
    # A shape claim far beyond memory, with one value to broadcast: refused before allocation.
    ("huge shape claim", _request(inputs=_with_tag(_proto(FLOAT, [10**12, 3], float_val=[1.0]))),
     "input 'x': tensor of 3000000000000 elements exceeds the limit"),
    ("huge empty shape claim", _request(inputs=_with_tag(_proto(FLOAT, [0, 2**62, 2**62]))),
     "input 'x': tensor shape \\[0, 4611686018427387904, 4611686018427387904\\] exceeds the limit"),
    ("huge string shape claim", _request(inputs={"x": X, "tag": _proto(types_pb2.DT_STRING, [10**9], string_val=[b"a"])}),
     "input 'tag': tensor of 1000000000 elements exceeds the limit"),
    # ModelSpec.
    ("no model_spec", predict_pb2.PredictRequest(inputs={"x": tf.make_tensor_proto(X)}), "Missing ModelSpec"),
    ("empty model_spec", predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec()), "Missing ModelSpec"),
    ("model_spec without a name", _request(model="", version=1), "Missing ModelSpec"),
    ("no inputs at all", _request(inputs={}), "missing input 'tag' for signature 'serving_default'"),
    ("no inputs for one-input signature", _request(inputs={}, signature_name="checked"), "missing input 'x'"),
    # Images.
    ("truncated jpeg", _request("cnn", _images(JPEG[: len(JPEG) // 2])),
     "input 'images' item 0: corrupt or truncated image"),
    ("truncated png", _request("cnn", _images(PNG[: len(PNG) // 2])),
     "input 'images' item 0: corrupt or truncated image"),
    ("not an image", _request("cnn", _images(PNG, b"GIF89a not really")), "input 'images' item 1: not a decodable image"),
    ("image over the pixel limit", _request("cnn", _images(_image("PNG", size=(65, 64)))),
     "image of 65x64 = 4160 pixels exceeds the limit of 4096"),
]


@pytest.mark.parametrize("request_, message", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_bad_predict_is_invalid_argument(client, request_, message):
    code, details = _error(lambda: client.predict.Predict(request_, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details and re.search(message, details), details
    assert_still_serving(client)


def test_huge_shape_claim_is_refused_before_allocation(client):
    # 10**8 float64 elements would be 800 MB: the refusal must come from the shape, at once.
    request = _request(inputs=_with_tag(_proto(types_pb2.DT_DOUBLE, [10**8 // 3 + 1, 3], double_val=[0.0])))
    start = time.perf_counter()
    code, details = _error(lambda: client.predict.Predict(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in details
    assert time.perf_counter() - start < 2.0


def test_empty_model_spec_is_refused_by_every_method(client):
    empty = model_pb2.ModelSpec()
    example_input = {"example_list": {"examples": [models.make_example([1, 2, 3])]}}
    calls = {
        "Classify": lambda: client.predict.Classify(
            classification_pb2.ClassificationRequest(model_spec=empty, input=example_input), timeout=30),
        "Regress": lambda: client.predict.Regress(
            regression_pb2.RegressionRequest(model_spec=empty, input=example_input), timeout=30),
        "MultiInference": lambda: client.predict.MultiInference(inference_pb2.MultiInferenceRequest(
            tasks=[inference_pb2.InferenceTask(model_spec=empty, method_name="tensorflow/serving/regress")],
            input=example_input), timeout=30),
        "GetModelMetadata": lambda: client.predict.GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(model_spec=empty, metadata_field=["signature_def"]),
            timeout=30),
        "GetModelStatus": lambda: client.models.GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec=empty), timeout=30),
    }
    for method, call in calls.items():
        code, details = _error(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Missing ModelSpec" in details, (method, code, details)
    assert_still_serving(client)


def test_version_and_label_both_on_the_wire_last_one_wins(client):
    # ModelSpec's version and version_label are a oneof: a message carrying both (here
    # two concatenated ModelSpec encodings, which protobuf merges) keeps the last one,
    # as in TF Serving. Neither order may fail with anything but a clear answer.
    raw_predict = client.channel.unary_unary(PREDICT)   # bytes in, bytes out

    def send(*specs) -> bytes:
        head = _request(inputs={"x": X, "tag": TAGS})
        head.ClearField("model_spec")
        body = b"".join(_field(1, spec.SerializeToString()) for spec in specs)
        return raw_predict(body + head.SerializeToString(), timeout=30)

    by_label = predict_pb2.PredictResponse.FromString(send(
        model_pb2.ModelSpec(name="two", version={"value": 7}), model_pb2.ModelSpec(version_label="stable")))
    assert by_label.model_spec.version.value == 1
    np.testing.assert_allclose(tf.make_ndarray(by_label.outputs["y"]), models.two_input_expected(X), atol=1e-5)
    code, details = _error(lambda: send(model_pb2.ModelSpec(name="two", version_label="stable"),
                                        model_pb2.ModelSpec(version={"value": 7})))
    assert code == grpc.StatusCode.NOT_FOUND and "Specific(two, 7)" in details


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_garbage_message_bytes_are_refused(client):
    raw_predict = client.channel.unary_unary(PREDICT)
    code, details = _error(lambda: raw_predict(b"\xff\xff\xff\xff\x0f garbage", timeout=30))
    # Refused before any servicer code runs (serving.grpc.server.DecodeGuard), naming the message.
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request bytes are not a valid request message for "
                              "/tensorflow.serving.PredictionService/Predict"), details
    assert_still_serving(client)
    # The guard is built once per method and reused: the next bad call is refused the same way.
    code, details = _error(lambda: raw_predict(b"\x0a\xff garbage", timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "valid request message" in details
    # A method nobody serves is UNIMPLEMENTED, as without the guard.
    code, _ = _error(lambda: client.channel.unary_unary("/no.Such/Method")(b"", timeout=30))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert_still_serving(client)


def test_oversize_message_is_resource_exhausted_and_the_server_stays_up(client):
    big = np.zeros((MAX_BYTES // 4 + 10,), dtype=np.float32)
    request = _request(inputs={"x": big, "tag": TAGS})
    for _ in range(3):
        code, details = _error(lambda: client.predict.Predict(request, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "larger than max" in details, details
    assert_still_serving(client)
