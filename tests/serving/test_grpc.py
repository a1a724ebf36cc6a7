"""gRPC against a real graft-serve (in-process, 127.0.0.1) with tensorflow-serving-api's stubs.

Covers PredictionService, ModelService, health, reflection, hot reload under load
and HandleReloadConfigRequest. Expected values come from Keras and numpy.
"""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.config import model_server_config_pb2

from tests import models
from tests.models import write_model_config
from tests.serving.server import serving

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
TAGS = np.array([b"ab", b"\x00xyz"], dtype=object)
ROWS = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
MAX_BYTES = 1_000_000


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_cnn_savedmodel, two_input_savedmodel):
    root = tmp_path_factory.mktemp("grpc_repo")
    models.install_version(tiny_cnn_savedmodel, root / "cnn", 1)
    models.install_version(two_input_savedmodel, root / "two", 1)
    models.install_version(two_input_savedmodel, root / "hot", 1)
    return root


@pytest.fixture(scope="module")
def server(repo):
    config = write_model_config(repo / "models.config",
                                {"cnn": repo / "cnn", "two": repo / "two", "hot": repo / "hot"},
                                {"two": 'version_labels { key: "stable" value: 1 }'})
    with serving(model_config_file=str(config), file_system_poll_wait_seconds=0.2,
                 max_request_bytes=MAX_BYTES, max_image_pixels=64 * 64) as (_, client):
        yield client


def _request(model="two", inputs=None, signature="", version=None, label=None, output_filter=()):
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if inputs is None:
        inputs = {"x": X, "tag": TAGS}
    for name, value in inputs.items():
        proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        request.inputs[name].CopyFrom(proto)
    return request


def _outputs(response) -> dict:
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# ------------------------------------------------------------------------- predict


def test_predict_two_inputs(server):
    response = server.predict.Predict(_request(), timeout=30)
    out = _outputs(response)
    np.testing.assert_allclose(out["y"], models.two_input_expected(X), atol=1e-5)
    assert out["tag_len"].tolist() == [2, 4] and out["label_bytes"].tolist() == TAGS.tolist()
    assert response.model_spec.name == "two"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_predict_cnn_matches_keras_with_content_and_typed_fields(server, tiny_cnn_keras):
    images = np.random.default_rng(9).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = tiny_cnn_keras.predict(images, verbose=0)
    out = _outputs(server.predict.Predict(_request("cnn", {"images": images}), timeout=30))
    np.testing.assert_allclose(out["output_0"], expected, atol=1e-5)
    typed = tf.make_tensor_proto(images)
    typed.ClearField("tensor_content")
    typed.float_val.extend(images.reshape(-1).tolist())
    out = _outputs(server.predict.Predict(_request("cnn", {"images": typed}), timeout=30))
    np.testing.assert_allclose(out["output_0"], expected, atol=1e-5)


def test_predict_encoded_images(server, tiny_cnn_keras):
    pixels = np.random.default_rng(10).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    encoded = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    out = _outputs(server.predict.Predict(_request("cnn", {"images": np.array(encoded, dtype=object)}), timeout=30))
    np.testing.assert_allclose(out["output_0"], tiny_cnn_keras.predict(pixels.astype(np.float32), verbose=0),
                               atol=1e-5)


def test_output_filter_version_and_label(server):
    for spec in ({"version": 1}, {"label": "stable"}):
        response = server.predict.Predict(_request(output_filter=["y"], **spec), timeout=30)
        assert list(response.outputs) == ["y"]
        assert response.model_spec.version.value == 1


# --------------------------------------------------------------- classify & friends


def _input(rows=ROWS, context=None) -> input_pb2.Input:
    # A row of None is an example without features (the context supplies them).
    examples = [models.make_example(r) if r is not None else example_pb2.Example() for r in rows]
    if context is None:
        return input_pb2.Input(example_list=input_pb2.ExampleList(examples=examples))
    return input_pb2.Input(example_list_with_context=input_pb2.ExampleListWithContext(
        examples=examples, context=models.make_example(context)))


def _softmax(y):
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_classify_regress_multi_inference(server):
    y = models.two_input_expected(ROWS)
    request = classification_pb2.ClassificationRequest(input=_input())
    request.model_spec.name, request.model_spec.signature_name = "two", "classify"
    response = server.predict.Classify(request, timeout=30)
    assert response.model_spec.version.value == 1
    classes = response.result.classifications
    assert [[c.label for c in row.classes] for row in classes] == [["neg", "pos"]] * 2
    np.testing.assert_allclose([[c.score for c in row.classes] for row in classes], _softmax(y), atol=1e-5)

    request = regression_pb2.RegressionRequest(input=_input([None, None], context=[1.0, 1.0, 1.0]))
    request.model_spec.name, request.model_spec.signature_name = "two", "regress"
    values = [r.value for r in server.predict.Regress(request, timeout=30).result.regressions]
    np.testing.assert_allclose(values, models.two_input_expected(np.ones((2, 3))).sum(1), atol=1e-5)

    multi = inference_pb2.MultiInferenceRequest(input=_input())
    for signature, method in (("classify", models.CLASSIFY_METHOD), ("regress", models.REGRESS_METHOD)):
        task = multi.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = "two", signature
    results = server.predict.MultiInference(multi, timeout=30).results
    np.testing.assert_allclose([[c.score for c in row.classes] for row in results[0].classification_result.classifications],
                               _softmax(y), atol=1e-5)
    np.testing.assert_allclose([r.value for r in results[1].regression_result.regressions], y.sum(1), atol=1e-5)
    assert results[1].model_spec.signature_name == "regress"


def test_classify_on_a_predict_signature_is_refused(server):
    request = classification_pb2.ClassificationRequest(input=_input())
    request.model_spec.name = "two"
    code, details = _code(lambda: server.predict.Classify(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Expected classification signature method_name to be tensorflow/serving/classify" in details
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "two", "classify"
    assert _code(lambda: server.predict.Classify(request, timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "Input is empty")


# ----------------------------------------------------------------- metadata, status


def test_metadata_and_status(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "two"
    response = server.predict.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert set(signature_map.signature_def) == {"serving_default", "checked", "classify", "regress"}
    assert signature_map.signature_def["regress"].method_name == models.REGRESS_METHOD
    bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["other"])
    bad.model_spec.name = "two"
    assert _code(lambda: server.predict.GetModelMetadata(bad, timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT

    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "two"
    versions = server.models.GetModelStatus(status, timeout=30).model_version_status
    assert [(v.version, v.state, v.status.error_code) for v in versions] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)]


def test_health_and_reflection(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(server.channel).get_services())
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
            "grpc.health.v1.Health"} <= services


# -------------------------------------------------------------------------- errors


def _bad_content():
    tp = tf.make_tensor_proto(X)
    tp.tensor_content = tp.tensor_content[:-4]
    return tp


GRPC_ERRORS = [
    ("unknown model", dict(model="ghost"), grpc.StatusCode.NOT_FOUND, "Servable not found"),
    ("unknown version", dict(version=5), grpc.StatusCode.NOT_FOUND, "Servable not found"),
    ("unknown label", dict(label="canary"), grpc.StatusCode.INVALID_ARGUMENT, "label"),
    ("unknown signature", dict(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION, 'signature key "nope"'),
    ("unknown input", dict(inputs={"x": X, "tag": TAGS, "q": X}), grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'q'"),
    ("missing input", dict(inputs={"x": X}), grpc.StatusCode.INVALID_ARGUMENT, "missing input 'tag'"),
    ("wrong dtype", dict(inputs={"x": X.astype(np.float64), "tag": TAGS}), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'x' expects float32 but got float64"),
    ("wrong shape", dict(inputs={"x": X[:, :2], "tag": TAGS}), grpc.StatusCode.INVALID_ARGUMENT,
     r"input 'x' expects shape [-1, 3] but got [2, 2]"),
    ("batch sizes", dict(inputs={"x": X, "tag": TAGS[:1]}), grpc.StatusCode.INVALID_ARGUMENT,
     "inconsistent batch sizes"),
    ("bad content", dict(inputs={"x": _bad_content(), "tag": TAGS}), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'x': tensor_content holds 20 bytes"),
    ("bad filter", dict(output_filter=["zzz"]), grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found"),
    ("model error", dict(signature="checked", inputs={"x": -X}), grpc.StatusCode.INVALID_ARGUMENT, "x must be >= 0"),
    ("image too big", dict(model="cnn", inputs={"images": np.array([b"PIXELS"], dtype=object)}),
     grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit of 4096"),
]


@pytest.mark.parametrize("kwargs, code, message", [e[1:] for e in GRPC_ERRORS], ids=[e[0] for e in GRPC_ERRORS])
def test_predict_errors(server, kwargs, code, message):
    inputs = kwargs.get("inputs")
    if inputs is not None and "images" in inputs:
        buf = io.BytesIO()
        Image.new("RGB", (100, 100)).save(buf, format="PNG")
        kwargs = dict(kwargs, inputs={"images": np.array([buf.getvalue()], dtype=object)})
    got_code, details = _code(lambda: server.predict.Predict(_request(**kwargs), timeout=30))
    assert got_code == code, details
    assert message in details


def _grpc_request_counts(client) -> dict[tuple, float]:
    """graft_requests_total with protocol "grpc", by (model, version, signature, method, code), from /metrics."""
    text = client.http.get(client.rest + "/metrics", timeout=30).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "graft_requests"]
    return {(s.labels["model"], s.labels["version"], s.labels["signature"], s.labels["method"], s.labels["code"]):
            s.value for s in family.samples if s.name == "graft_requests_total" and s.labels["protocol"] == "grpc"}


def test_refusals_before_the_service_are_counted(server):
    before = _grpc_request_counts(server)
    bad_tensor = _request(inputs={"x": _bad_content(), "tag": TAGS})
    no_model = _request(model="")
    for request in (bad_tensor, no_model):
        assert _code(lambda: server.predict.Predict(request, timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT
    no_tasks = inference_pb2.MultiInferenceRequest()
    assert _code(lambda: server.predict.MultiInference(no_tasks, timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT
    server.predict.Predict(_request(), timeout=30)
    after = _grpc_request_counts(server)
    moved = {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}
    assert moved == {
        ("two", "", "", "predict", "INVALID_ARGUMENT"): 1,
        ("", "", "", "predict", "INVALID_ARGUMENT"): 1,
        ("", "", "", "multi_inference", "INVALID_ARGUMENT"): 1,
        ("two", "1", "serving_default", "predict", "OK"): 1,
    }


def test_message_over_the_limit(server):
    big = np.zeros((MAX_BYTES // 12 + 10, 3), dtype=np.float32)
    request = _request(inputs={"x": big, "tag": np.array([b""] * len(big), dtype=object)})
    assert _code(lambda: server.predict.Predict(request, timeout=30))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------------- hot reload


def test_hot_reload_under_load_loses_nothing(server, repo, two_input_savedmodel):
    failures, versions = [], []
    stop = threading.Event()

    def client_loop():
        while not stop.is_set():
            try:
                response = server.predict.Predict(_request("hot"), timeout=30)
                out = _outputs(response)
                np.testing.assert_allclose(out["y"], models.two_input_expected(X), atol=1e-5)
                versions.append(response.model_spec.version.value)
            except Exception as exc:  # every failure is a test failure; keep going to count them
                failures.append(repr(exc))

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        time.sleep(0.3)
        models.install_version(two_input_savedmodel, repo / "hot", 2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not versions or versions[-1] != 2):
            time.sleep(0.05)
        seen_v2 = len(versions)
        time.sleep(0.5)  # keep sending while version 1 unloads
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert versions[0] == 1 and 2 in versions
    # Once a request reached v2, every later one did too (v1 is not served again).
    first_v2 = versions.index(2)
    assert set(versions[first_v2:]) == {2} and len(versions) > seen_v2
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "hot"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {v.version: v.state for v in server.models.GetModelStatus(status, timeout=10).model_version_status}
        if states.get(1) == get_model_status_pb2.ModelVersionStatus.END:
            break
        time.sleep(0.1)
    assert states == {2: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
                      1: get_model_status_pb2.ModelVersionStatus.END}


# ------------------------------------------------------------------- reload config


def _config(**models_by_name) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    for name, base in models_by_name.items():
        config.model_config_list.config.add(name=name, base_path=str(base), model_platform="tensorflow")
    return config


def test_handle_reload_config_request(repo):
    with serving(model_name="cnn", model_base_path=str(repo / "cnn")) as (_, client):
        reload = model_management_pb2.ReloadConfigRequest(config=_config(two=repo / "two"))
        response = client.models.HandleReloadConfigRequest(reload, timeout=60)
        assert response.status.error_code == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                out = _outputs(client.predict.Predict(_request("two"), timeout=30))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                time.sleep(0.1)
        np.testing.assert_allclose(out["y"], models.two_input_expected(X), atol=1e-5)
        # cnn is not in the new list: it is gone.
        while time.monotonic() < deadline and "cnn" in [m["name"] for m in client.http.get(
                client.rest + "/v1/models", timeout=10).json()["models"]]:
            time.sleep(0.1)
        images = np.zeros((1, 32, 32, 3), np.float32)
        assert _code(lambda: client.predict.Predict(_request("cnn", {"images": images}), timeout=30))[0] == \
            grpc.StatusCode.NOT_FOUND
        bad = model_management_pb2.ReloadConfigRequest(config=_config(two=""))
        assert _code(lambda: client.models.HandleReloadConfigRequest(bad, timeout=30))[0] == \
            grpc.StatusCode.INVALID_ARGUMENT


def test_reload_config_rpc_can_be_turned_off(repo, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "cnn" base_path: "{repo / "cnn"}" '
                      f'model_platform: "tensorflow" }} }}\n')
    with serving(model_config_file=str(config), model_config_file_poll_wait_seconds=0.2,
                 enable_reload_config_rpc=False) as (_, client):
        reload = model_management_pb2.ReloadConfigRequest(config=_config(two=repo / "two"))
        code, details = _code(lambda: client.models.HandleReloadConfigRequest(reload, timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "--enable_reload_config_rpc=false" in details
        assert [m["name"] for m in client.http.get(client.rest + "/v1/models", timeout=10).json()["models"]] == ["cnn"]
        # The operator's config file still reloads.
        config.write_text(f'model_config_list {{ config {{ name: "two" base_path: "{repo / "two"}" '
                          f'model_platform: "tensorflow" }} }}\n')
        deadline = time.monotonic() + 30
        while True:
            try:
                out = _outputs(client.predict.Predict(_request("two"), timeout=30))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline
                time.sleep(0.1)
        np.testing.assert_allclose(out["y"], models.two_input_expected(X), atol=1e-5)
