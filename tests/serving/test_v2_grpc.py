"""V2 (Open Inference Protocol) gRPC against a real graft-serve, with tritonclient.grpc as the client.

The V2 service shares the port of TF Serving's services. tritonclient's own
``inference`` protos and Graft's live in one process here (Graft's stubs use a
private descriptor pool), and Graft's stubs also send typed ``contents``, which
tritonclient never does (it always sends raw_input_contents).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tensorflow_serving.apis import predict_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from serving.codecs import tensor_proto
from serving.protos.inference import grpc_service_pb2 as pb
from serving.protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests import models
from tests.serving.server import serving

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
TAGS = np.array([b"ab", b"\xff\x00z"], dtype=object)


@pytest.fixture(scope="module")
def server(cnn_and_two_repo):
    config = cnn_and_two_repo("v2_grpc_repo", stable=False)
    with serving(model_config_file=str(config), enable_batching=True) as (_, client):
        yield client


@pytest.fixture(scope="module")
def triton(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    return pb_grpc.GRPCInferenceServiceStub(server.channel)


def _two_inputs(x: np.ndarray = X, tags: np.ndarray = TAGS):
    xin = grpcclient.InferInput("x", list(x.shape), "FP32")
    xin.set_data_from_numpy(x)
    tin = grpcclient.InferInput("tag", list(tags.shape), "BYTES")
    tin.set_data_from_numpy(tags)
    return [xin, tin]


def test_both_inference_protos_load_in_one_process():
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == triton_pb2.ModelInferRequest.DESCRIPTOR.full_name
    assert pb.DESCRIPTOR.pool is not triton_pb2.DESCRIPTOR.pool
    # Same wire format: a message of one decodes as the other.
    ours = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01"])
    theirs = triton_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "m" and list(theirs.raw_input_contents) == [b"\x01"]


def test_live_and_ready(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("cnn")
    assert triton.is_model_ready("two", "1")
    assert not triton.is_model_ready("two", "4")
    assert not triton.is_model_ready("nope")


def test_server_metadata(triton):
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "graft" and meta["extensions"] == ["binary_tensor_data"]


def test_model_metadata(triton):
    meta = triton.get_model_metadata("two", as_json=True)
    assert meta["name"] == "two" and meta["versions"] == ["1"] and meta["platform"] == "tensorflow_savedmodel"
    # as_json renders int64 as strings, as protobuf's JSON mapping does.
    assert meta["inputs"] == [{"name": "tag", "datatype": "BYTES", "shape": ["-1"]},
                              {"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]
    assert [o["name"] for o in meta["outputs"]] == ["label_bytes", "tag_len", "y"]
    cnn = triton.get_model_metadata("cnn")
    assert [list(t.shape) for t in cnn.inputs] == [[-1, 32, 32, 3]]


def test_infer_fp32_matches_keras(triton, tiny_cnn_keras):
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    inp = grpcclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = triton.infer("cnn", [inp], request_id="g1")
    np.testing.assert_allclose(result.as_numpy("output_0"), tiny_cnn_keras.predict(images, verbose=0),
                               rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("cnn", "1", "g1")


def test_infer_bytes(triton):
    result = triton.infer("two", _two_inputs())
    assert result.as_numpy("label_bytes").tolist() == TAGS.tolist()
    assert result.as_numpy("tag_len").tolist() == [2, 3]
    np.testing.assert_allclose(result.as_numpy("y"), models.two_input_expected(X), atol=1e-5)


def test_selected_outputs(triton):
    result = triton.infer("two", _two_inputs(), outputs=[grpcclient.InferRequestedOutput("y")])
    assert [o.name for o in result.get_response().outputs] == ["y"]
    assert result.as_numpy("tag_len") is None
    np.testing.assert_allclose(result.as_numpy("y"), models.two_input_expected(X), atol=1e-5)


def test_unknown_model(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("nope", _two_inputs())
    assert info.value.status() == "StatusCode.NOT_FOUND" and "nope" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_bad_shape(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("two", _two_inputs(x=np.zeros((2, 4), np.float32)))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'x'" in info.value.message() and "shape" in info.value.message()


def test_raw_content_must_fill_the_shape(stub):
    request = pb.ModelInferRequest(model_name="two", raw_input_contents=[X.tobytes()[:-4], b""])
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    request.inputs.add(name="tag", datatype="BYTES", shape=[2])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'x' has 20 bytes of raw data" in info.value.details()


def test_typed_contents(stub):
    request = pb.ModelInferRequest(model_name="two", model_version="1", id="typed")
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    x.contents.fp32_contents.extend(X.reshape(-1).tolist())
    tag = request.inputs.add(name="tag", datatype="BYTES", shape=[2])
    tag.contents.bytes_contents.extend(TAGS.tolist())
    request.outputs.add(name="tag_len")
    request.outputs.add(name="label_bytes")
    response = stub.ModelInfer(request, timeout=30)
    assert (response.model_name, response.model_version, response.id) == ("two", "1", "typed")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("tag_len", "INT64", [2]), ("label_bytes", "BYTES", [2])]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [2, 3]
    # BYTES raw data: a 4-byte little-endian length before each element.
    assert response.raw_output_contents[1] == b"\x02\x00\x00\x00ab\x03\x00\x00\x00\xff\x00z"


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r.inputs[0].contents.fp32_contents.pop(), "5 elements but shape [2, 3] needs 6"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "raw_input_contents"),
    (lambda r: setattr(r.inputs[0], "datatype", "BF16"), "unsupported datatype 'BF16'"),
    (lambda r: r.raw_input_contents.append(b"\x00" * 24), "sets contents although raw_input_contents is used"),
    (lambda r: r.raw_input_contents.extend([b"", b""]), "raw_input_contents has 2 entries but the request has 1"),
    (lambda r: r.parameters["signature_name"].CopyFrom(pb.InferParameter(int64_param=3)), "signature_name"),
    (lambda r: r.outputs.add(name="y", parameters={"classification": pb.InferParameter(int64_param=2)}),
     "classification"),
])
def test_bad_typed_requests(stub, mutate, needle):
    request = pb.ModelInferRequest(model_name="two")
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    x.contents.fp32_contents.extend(X.reshape(-1).tolist())
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
    assert needle in info.value.details()


def test_int_contents_out_of_range(stub):
    request = pb.ModelInferRequest(model_name="two")
    request.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range for INT8" in info.value.details()


def test_same_port_serves_tf_serving(server, triton):
    # One port: a TF Serving Predict and a V2 infer on the same channel target give the same answer.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "two"
    request.inputs["x"].CopyFrom(tensor_proto.numpy_to_tensor_proto(X))
    request.inputs["tag"].CopyFrom(tensor_proto.numpy_to_tensor_proto(TAGS))
    tf_y = tensor_proto.tensor_proto_to_numpy(server.predict.Predict(request, timeout=30).outputs["y"], max_elements=100)
    v2_y = triton.infer("two", _two_inputs()).as_numpy("y")
    np.testing.assert_array_equal(tf_y, v2_y)


def test_generator_builds_inference_protos_in_a_private_pool(tmp_path):
    from serving.protos import generate

    root = tmp_path / "protos"
    (root / "inference").mkdir(parents=True)
    (root / "inference" / "ping.proto").write_text(
        'syntax = "proto3";\npackage inference;\nmessage Ping { int64 n = 1; }\n')
    out = tmp_path / "out"
    generate.generate(out, root, package="gentest")
    text = (out / "inference" / "ping_pb2.py").read_text()
    assert "_descriptor_pool.DescriptorPool().AddSerializedFile(" in text
    assert "_descriptor_pool.Default()" not in text
    # A private pool holds only its own file, so imports are refused up front.
    (root / "inference" / "ping.proto").write_text(
        'syntax = "proto3";\npackage inference;\nimport "google/protobuf/wrappers.proto";\n'
        "message Ping { google.protobuf.Int64Value n = 1; }\n")
    with pytest.raises(ValueError, match="private descriptor pool"):
        generate.generate(out, root, package="gentest")
