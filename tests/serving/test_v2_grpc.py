"""V2 (Open Inference Protocol) gRPC against a real graft-serve, with tritonclient.grpc as the client.

The V2 service shares the port of TF Serving's services. tritonclient's own
``inference`` protos and Graft's live in one process here (Graft's stubs use a
private descriptor pool), and Graft's stubs also send typed ``contents``, which
tritonclient never does (it always sends raw_input_contents). Triton's
statistics, model repository and model configuration extensions are called as
tritonclient calls them; expected counts come from the requests the test sent.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tensorflow_serving.apis import predict_pb2
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from serving.codecs import tensor_proto
from serving.grpc.server import SERVED_SERVICES
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
    assert meta["name"] == "graft"
    assert meta["extensions"] == ["binary_tensor_data", "statistics", "model_repository", "model_configuration"]


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


# ------------------------------------------------------------------ Triton's extensions


def _triton_message(name: str):
    """tritonclient's descriptor of ``inference.<name>``, from either of its two files."""
    for module in (triton_pb2, triton_config_pb2):
        try:
            return module.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{name}")
        except KeyError:
            continue
    raise KeyError(name)


def _messages(descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _messages(nested)


def test_every_declared_field_has_tritons_number_and_type():
    """Graft declares a subset of Triton's messages; what it declares must match tritonclient's wire format."""
    # The Open Inference Protocol's own field, which Triton's proto lacks (its clients skip it).
    open_inference_only = {"inference.ModelMetadataResponse.properties",
                           "inference.ModelMetadataResponse.PropertiesEntry"}
    checked = 0
    for top in pb.DESCRIPTOR.message_types_by_name.values():
        for ours in _messages(top):
            if ours.full_name in open_inference_only:
                continue
            theirs = _triton_message(ours.full_name.removeprefix("inference."))
            for field in ours.fields:
                if field.full_name in open_inference_only:
                    continue
                other = theirs.fields_by_name.get(field.name)
                assert other is not None, f"{ours.full_name}.{field.name} is not Triton's"
                assert (field.number, field.type, field.is_repeated) == (
                    other.number, other.type, other.is_repeated), f"{ours.full_name}.{field.name}"
                checked += 1
    assert checked > 100
    enums = list(pb.DESCRIPTOR.enum_types_by_name.values()) + [
        e for top in pb.DESCRIPTOR.message_types_by_name.values() for m in _messages(top) for e in m.enum_types]
    for ours in enums:
        theirs = triton_config_pb2.DESCRIPTOR.pool.FindEnumTypeByName(ours.full_name)
        assert {v.name: v.number for v in ours.values} == {v.name: v.number for v in theirs.values}, ours.full_name
    assert len(enums) == 2
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            theirs.input_type.full_name, theirs.output_type.full_name)


def test_reflection_lists_every_served_service(server):
    database = ProtoReflectionDescriptorDatabase(server.channel)
    assert set(database.get_services()) == set(SERVED_SERVICES)
    assert "inference.GRPCInferenceService" in SERVED_SERVICES
    # The V2 service's file resolves too (from Graft's private pool), RPCs and messages included.
    proto = database.FindFileContainingSymbol("inference.GRPCInferenceService")
    (service,) = [s for s in proto.service if s.name == "GRPCInferenceService"]
    assert {"ModelInfer", "ModelStatistics", "RepositoryModelLoad", "ModelConfig"} <= {m.name for m in service.method}
    assert database.FindFileContainingSymbol("tensorflow.serving.PredictionService").name.endswith(
        "prediction_service.proto")
    for name in SERVED_SERVICES:  # every listed service resolves to the file that declares it
        assert name.rsplit(".", 1)[1] in {s.name for s in database.FindFileContainingSymbol(name).service}, name


def _stats(triton, model, version=""):
    (stat,) = triton.get_inference_statistics(model, version, as_json=True)["model_stats"]
    return stat


def _count(stat, key):
    return int(stat["inference_stats"][key].get("count", 0)), int(stat["inference_stats"][key].get("ns", 0))


def test_statistics_count_what_ran(triton):
    images = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    before = _stats(triton, "cnn")
    started_ms = time.time() * 1000
    for _ in range(3):
        inp = grpcclient.InferInput("images", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        triton.infer("cnn", [inp])
    bad = grpcclient.InferInput("images", [1, 31, 32, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 31, 32, 3), np.float32))
    with pytest.raises(InferenceServerException):
        triton.infer("cnn", [bad])
    after = _stats(triton, "cnn", "1")
    assert (after["name"], after["version"]) == ("cnn", "1")
    # as_json renders uint64 as strings, as protobuf's JSON mapping does.
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 6
    assert started_ms - 1 <= int(after["last_inference"]) <= time.time() * 1000 + 1
    delta = {k: tuple(a - b for a, b in zip(_count(after, k), _count(before, k)))
             for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
    assert delta["success"][0] == 3 and delta["fail"][0] == 1
    assert all(delta[k][0] == 3 for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert delta["compute_infer"][1] > 0 and delta["fail"][1] > 0
    # A request's wait and run lie within its own time, in nanoseconds.
    inside = sum(delta[k][1] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < inside <= delta["success"][1] + 1000
    assert delta["success"][1] < 3 * 60 * 10**9
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert 1 <= executions <= 3
    # Batching runs here: each run is counted under its batch size (2 rows each, or merged).
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    old = {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in before.get("batch_stats", [])}
    assert sum(sizes.values()) - sum(old.values()) == executions
    assert set(sizes) - set(old) <= {2, 4, 6}


def test_statistics_of_every_model_and_unknown_ones(triton):
    names = {(s["name"], s["version"]) for s in triton.get_inference_statistics(as_json=True)["model_stats"]}
    assert {("cnn", "1"), ("two", "1")} <= names
    for model, version in (("nope", ""), ("cnn", "9")):
        with pytest.raises(InferenceServerException) as info:
            triton.get_inference_statistics(model, version)
        assert info.value.status() == "StatusCode.NOT_FOUND"


def test_model_config(triton):
    config = triton.get_model_config("cnn").config
    assert isinstance(config, triton_config_pb2.ModelConfig)  # tritonclient's own message reads it
    assert (config.name, config.platform, config.backend) == ("cnn", "tensorflow_savedmodel", "tensorflow")
    # Batching runs with TF Serving's default parameters: the batch dimension leaves the dims.
    assert config.max_batch_size == 1000 and config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("images", triton_config_pb2.TYPE_FP32, [32, 32, 3])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("output_0", triton_config_pb2.TYPE_FP32, [3])]
    assert config.version_policy.latest.num_versions == 1
    two = triton.get_model_config("two", "1", as_json=True)["config"]
    assert [(t["name"], t["data_type"]) for t in two["input"]] == [("tag", "TYPE_STRING"), ("x", "TYPE_FP32")]
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_config("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def _index(triton):
    return {(m.name, m.version): (m.state, m.reason) for m in triton.get_model_repository_index().models}


def test_repository_index_unload_and_load(triton):
    assert _index(triton) == {("cnn", "1"): ("READY", ""), ("two", "1"): ("READY", "")}
    images = np.zeros((1, 32, 32, 3), np.float32)
    inp = grpcclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    triton.unload_model("cnn")
    try:
        assert _index(triton)[("cnn", "1")] == ("UNAVAILABLE", "unloaded")
        assert not triton.is_model_ready("cnn")
        assert triton.is_server_ready()  # a model a client unloaded does not make the server unready
        with pytest.raises(InferenceServerException) as info:
            triton.infer("cnn", [inp])
        assert info.value.status() == "StatusCode.NOT_FOUND"
        ready_only = triton.get_model_repository_index(as_json=True)["models"]
        assert [m["name"] for m in ready_only if m["state"] == "READY"] == ["two"]
    finally:
        triton.load_model("cnn")
    assert triton.is_model_ready("cnn")
    assert _index(triton)[("cnn", "1")] == ("READY", "")
    assert triton.infer("cnn", [inp]).as_numpy("output_0").shape == (1, 3)


def test_repository_errors(triton):
    for call, status in ((lambda: triton.load_model("nope"), "StatusCode.NOT_FOUND"),
                         (lambda: triton.unload_model("nope"), "StatusCode.NOT_FOUND"),
                         (lambda: triton.load_model("cnn", config='{"max_batch_size": 4}'),
                          "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == status
    assert "nope" in _error(lambda: triton.load_model("nope"))
    assert "'config'" in _error(lambda: triton.load_model("cnn", config="{}"))
    assert triton.is_model_ready("cnn")


def _error(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.message()
