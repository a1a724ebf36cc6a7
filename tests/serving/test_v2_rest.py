"""V2 (Open Inference Protocol) REST against a real graft-serve, with tritonclient.http as the client.

tritonclient sends binary tensor data by default (``Inference-Header-Content-Length``),
so its tests cover the binary extension; plain JSON requests go through ``requests``.
Expected values come from the Keras model and from numpy, never from the server.
Triton's statistics, model repository and model configuration extensions are
called as tritonclient calls them; expected counts come from the requests sent.
"""

from __future__ import annotations

import gzip
import json
import struct
import time
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests import models
from tests.serving.server import serving

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
TAGS = np.array([b"ab", b"\xff\x00z"], dtype=object)  # the second is not UTF-8 text


@pytest.fixture(scope="module")
def server(cnn_and_two_repo):
    config = cnn_and_two_repo("v2_rest_repo")
    with serving(model_config_file=str(config), enable_batching=True) as (_, client):
        yield client


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.rest_port}")
    yield client
    client.close()


def _two_inputs(binary: bool = True, x: np.ndarray = X, tags: np.ndarray = TAGS):
    xin = httpclient.InferInput("x", list(x.shape), "FP32")
    xin.set_data_from_numpy(x, binary_data=binary)
    tin = httpclient.InferInput("tag", list(tags.shape), "BYTES")
    tin.set_data_from_numpy(tags, binary_data=binary)
    return [xin, tin]


def _post(server, path, body=None, **kwargs):
    data = kwargs.pop("data", None)
    if data is None:
        data = json.dumps(body)
    return server.http.post(server.rest + path, data=data, timeout=30, **kwargs)


# ------------------------------------------------------------------- health, metadata


def test_live_and_ready(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("cnn")
    assert triton.is_model_ready("two", "1")
    assert triton.is_model_ready("two", "stable")  # a label stands for its version
    assert not triton.is_model_ready("two", "7")
    assert not triton.is_model_ready("nope")


def test_health_answers_follow_the_protocol(server):
    for path, status in [("/v2/health/live", 200), ("/v2/health/ready", 200), ("/v2/models/cnn/ready", 200),
                         ("/v2/models/nope/ready", 404), ("/v2/models/cnn/versions/9/ready", 404),
                         ("/v2/models/two/versions/canary/ready", 400)]:
        r = server.http.get(server.rest + path, timeout=30)
        assert (r.status_code, r.content) == (status, b""), path


def test_server_metadata(triton, server):
    meta = triton.get_server_metadata()
    assert meta["name"] == "graft" and "binary_tensor_data" in meta["extensions"]
    assert server.http.get(server.rest + "/v2/", timeout=30).json() == meta


def test_model_metadata(triton):
    meta = triton.get_model_metadata("two")
    assert meta["name"] == "two" and meta["versions"] == ["1"] and meta["platform"] == "tensorflow_savedmodel"
    assert meta["inputs"] == [{"name": "tag", "datatype": "BYTES", "shape": [-1]},
                              {"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "label_bytes", "datatype": "BYTES", "shape": [-1]},
                               {"name": "tag_len", "datatype": "INT64", "shape": [-1]},
                               {"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
    assert "parameters" not in meta  # no lineage file in this version
    cnn = triton.get_model_metadata("cnn", "1")
    assert cnn["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 32, 32, 3]}]
    assert cnn["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]}]


def test_metadata_of_unknown_model_is_404(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "404" and "nope" in info.value.message()


# ---------------------------------------------------------------------------- infer


@pytest.mark.parametrize("binary", [True, False])
def test_infer_fp32_matches_keras(triton, tiny_cnn_keras, binary):
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    inp = httpclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images, binary_data=binary)
    result = triton.infer("cnn", [inp], outputs=[httpclient.InferRequestedOutput("output_0", binary_data=binary)])
    out = result.as_numpy("output_0")
    assert out.dtype == np.float32 and out.shape == (3, 3)
    np.testing.assert_allclose(out, tiny_cnn_keras.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["model_name"] == "cnn" and response["model_version"] == "1"
    assert ("data" in response["outputs"][0]) is not binary


def test_infer_bytes_binary(triton):
    result = triton.infer("two", _two_inputs(), request_id="req-1")
    np.testing.assert_allclose(result.as_numpy("y"), models.two_input_expected(X), atol=1e-5)
    assert result.as_numpy("label_bytes").tolist() == TAGS.tolist()
    assert result.as_numpy("tag_len").tolist() == [2, 3]
    assert result.as_numpy("tag_len").dtype == np.int64
    assert result.get_response()["id"] == "req-1"


def test_infer_bytes_json(server):
    body = {"id": "j", "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.tolist()},  # nested form
        {"name": "tag", "datatype": "BYTES", "shape": [2], "data": ["héllo", "b"]}]}
    r = _post(server, "/v2/models/two/versions/1/infer", body)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    doc = r.json()
    assert doc["id"] == "j" and doc["model_version"] == "1"
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["label_bytes"] == {"name": "label_bytes", "datatype": "BYTES", "shape": [2],
                                      "data": ["héllo", "b"]}
    assert outputs["tag_len"]["data"] == [len("héllo".encode()), 1]
    assert outputs["y"]["shape"] == [2, 2]
    np.testing.assert_allclose(np.reshape(outputs["y"]["data"], (2, 2)), models.two_input_expected(X), atol=1e-5)


def test_non_utf8_bytes_cannot_be_json(server):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                       {"name": "tag", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}
    header = json.dumps(body).encode()
    payload = header + struct.pack("<I", 2) + b"\xff\xfe"
    r = _post(server, "/v2/models/two/infer", data=payload,
              headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "binary_data" in r.json()["error"], r.text
    # The same request asking for binary outputs works and echoes the bytes.
    body["parameters"] = {"binary_data_output": True}
    header = json.dumps(body).encode()
    r = _post(server, "/v2/models/two/infer", data=header + struct.pack("<I", 2) + b"\xff\xfe",
              headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    result = httpclient.InferResult.from_response_body(
        r.content, header_length=int(r.headers["Inference-Header-Content-Length"]))
    assert result.as_numpy("label_bytes").tolist() == [b"\xff\xfe"]


def test_selected_outputs(triton):
    outputs = [httpclient.InferRequestedOutput("tag_len"), httpclient.InferRequestedOutput("y", binary_data=False)]
    result = triton.infer("two", _two_inputs(), outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["tag_len", "y"]
    assert result.as_numpy("label_bytes") is None
    assert result.as_numpy("tag_len").tolist() == [2, 3]
    np.testing.assert_allclose(result.as_numpy("y"), models.two_input_expected(X), atol=1e-5)


def test_unknown_output_is_400(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("two", _two_inputs(), outputs=[httpclient.InferRequestedOutput("nope")])
    assert info.value.status() == "400" and "nope" in info.value.message()


def test_unknown_model(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("nope", _two_inputs())
    assert info.value.status() == "404" and "nope" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.infer("two", _two_inputs(), model_version="9")
    assert info.value.status() == "404"


def test_bad_shape(triton, server):
    # Right element count, wrong shape for the signature ([N,3]).
    with pytest.raises(InferenceServerException) as info:
        triton.infer("two", _two_inputs(x=np.zeros((3, 2), np.float32), tags=TAGS[:1].repeat(3)))
    assert info.value.status() == "400" and "'x'" in info.value.message() and "shape" in info.value.message()
    # Data that does not fill the declared shape.
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3]},
                       {"name": "tag", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]}
    r = _post(server, "/v2/models/two/infer", body)
    assert r.status_code == 400 and r.json()["error"] == "tensor 'x' has 3 elements but shape [2, 3] needs 6"


@pytest.mark.parametrize("body, needle", [
    ({"inputs": []}, "'inputs'"),
    ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}, "FP99"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}, "shape"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ["a", "b", "c"]}]}, "numbers"),
    ({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [2 ** 40]}]}, "range"),
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]},
                 {"name": "tag", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, "float32"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                 {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}, "more than once"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
      "parameters": {"signature_name": "nope"}}, "nope"),
])
def test_bad_requests_are_400_naming_the_problem(server, body, needle):
    r = _post(server, "/v2/models/two/infer", body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_signature_parameter_selects_a_signature(server):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 4, 9]}],
            "parameters": {"signature_name": "checked"}}
    r = _post(server, "/v2/models/two/infer", body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("header, tail, needle", [
    ("999999", b"", "Inference-Header-Content-Length"),
    ("abc", b"", "Inference-Header-Content-Length"),
    (None, b"\x00" * 4, "binary"),           # extra bytes the inputs do not claim
    (None, b"\x00" * 24, "add up"),
])
def test_bad_binary_framing(server, header, tail, needle):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}},
                       {"name": "tag", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    head = json.dumps(body).encode()
    r = _post(server, "/v2/models/two/infer", data=head + tail,
              headers={"Inference-Header-Content-Length": header or str(len(head))})
    assert r.status_code == 400 and needle in r.json()["error"], r.text


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_requests(triton, encoding):
    result = triton.infer("two", _two_inputs(), request_compression_algorithm=encoding)
    np.testing.assert_allclose(result.as_numpy("y"), models.two_input_expected(X), atol=1e-5)


def test_corrupt_compressed_body_is_400(server):
    body = gzip.compress(json.dumps({"inputs": []}).encode())[:-6]
    r = _post(server, "/v2/models/two/infer", data=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    r = _post(server, "/v2/models/two/infer", data=zlib.compress(b"{}")[:3], headers={"Content-Encoding": "deflate"})
    assert r.status_code == 400 and "deflate" in r.json()["error"]


# ------------------------------------------------------------------ Triton's extensions


def _stats(triton, model, version=""):
    (stat,) = triton.get_inference_statistics(model, version)["model_stats"]
    return stat


STAT_KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def test_statistics_count_what_ran(triton, server):
    before = _stats(triton, "two", "1")
    started_ms = time.time() * 1000
    for _ in range(4):
        triton.infer("two", _two_inputs())                 # 2 rows each
    # A well-formed tensor that does not fit the signature fails at version 1; bodies that do not
    # decode never reach a version, so no version counts them.
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    assert _post(server, "/v2/models/two/versions/1/infer", body).status_code == 400
    assert _post(server, "/v2/models/two/infer", data="{not json").status_code == 400
    body["inputs"][0]["data"] = [1, 2]
    assert _post(server, "/v2/models/two/infer", body).status_code == 400
    after = _stats(triton, "two", "stable")                 # a label names its version
    assert (after["name"], after["version"]) == ("two", "1")
    assert after["inference_count"] - before["inference_count"] == 8
    assert started_ms - 1 <= after["last_inference"] <= time.time() * 1000 + 1
    delta = {k: (after["inference_stats"][k]["count"] - before["inference_stats"][k]["count"],
                 after["inference_stats"][k]["ns"] - before["inference_stats"][k]["ns"]) for k in STAT_KEYS}
    assert delta["success"][0] == 4 and delta["fail"][0] == 1
    assert all(delta[k][0] == 4 for k in STAT_KEYS[2:])
    assert delta["compute_infer"][1] > 0 and delta["fail"][1] > 0
    inside = sum(delta[k][1] for k in STAT_KEYS[2:])   # nanoseconds spent waiting and running
    assert 0 < inside <= delta["success"][1] + 1000
    executions = after["execution_count"] - before["execution_count"]
    assert 1 <= executions <= 4
    runs = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    old = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert sum(runs.values()) - sum(old.values()) == executions
    assert all(b["compute_infer"]["ns"] > 0 for b in after["batch_stats"])
    assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}  # no response cache


def test_statistics_routes(triton, server):
    every = triton.get_inference_statistics()["model_stats"]
    assert {("cnn", "1"), ("two", "1")} <= {(s["name"], s["version"]) for s in every}
    assert [s["name"] for s in triton.get_inference_statistics("cnn")["model_stats"]] == ["cnn"]
    for path in ("/v2/models/nope/stats", "/v2/models/cnn/versions/9/stats"):
        r = server.http.get(server.rest + path, timeout=30)
        assert r.status_code == 404 and "error" in r.json(), path
    r = server.http.get(server.rest + "/v2/models/two/versions/canary/stats", timeout=30)
    assert r.status_code == 400 and "canary" in r.json()["error"]


def test_model_config(triton, server):
    config = triton.get_model_config("two")
    assert {k: config[k] for k in ("name", "platform", "backend", "max_batch_size")} == {
        "name": "two", "platform": "tensorflow_savedmodel", "backend": "tensorflow", "max_batch_size": 1000}
    # Batching runs, so dims leave out the batch dimension, as in Triton's configs.
    assert config["input"] == [{"name": "tag", "data_type": "TYPE_STRING", "dims": []},
                               {"name": "x", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["output"] == [{"name": "label_bytes", "data_type": "TYPE_STRING", "dims": []},
                                {"name": "tag_len", "data_type": "TYPE_INT64", "dims": []},
                                {"name": "y", "data_type": "TYPE_FP32", "dims": [2]}]
    assert config["dynamic_batching"] == {"preferred_batch_size": [], "max_queue_delay_microseconds": 0}
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert triton.get_model_config("cnn", "1")["input"] == [
        {"name": "images", "data_type": "TYPE_FP32", "dims": [32, 32, 3]}]
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_config("nope")
    assert info.value.status() == "404"


def test_repository_index_unload_and_load(triton, server):
    index = triton.get_model_repository_index()
    assert index == [{"name": "cnn", "version": "1", "state": "READY", "reason": ""},
                     {"name": "two", "version": "1", "state": "READY", "reason": ""}]
    triton.unload_model("two")
    try:
        assert triton.get_model_repository_index()[1] == {
            "name": "two", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
        r = _post(server, "/v2/repository/index", {"ready": True})
        assert r.status_code == 200 and [m["name"] for m in r.json()] == ["cnn"]
        assert not triton.is_model_ready("two")
        assert triton.is_server_ready()  # a model a client unloaded does not make the server unready
        with pytest.raises(InferenceServerException) as info:
            triton.infer("two", _two_inputs())
        assert info.value.status() == "404"
        triton.unload_model("two")  # unloading an unloaded model changes nothing
    finally:
        triton.load_model("two")
    assert triton.is_model_ready("two") and triton.is_model_ready("two", "stable")  # its label is back
    np.testing.assert_allclose(triton.infer("two", _two_inputs()).as_numpy("y"), models.two_input_expected(X),
                               atol=1e-5)
    triton.load_model("two")  # loading a served model rescans it and keeps serving
    assert triton.is_model_ready("two")


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v2/repository/models/nope/load", None, 404, "nope"),
    ("/v2/repository/models/nope/unload", None, 404, "nope"),
    ("/v2/repository/models/two/load", {"parameters": {"config": "{}"}}, 400, "'config'"),
    ("/v2/repository/models/two/load", {"parameters": {"file:1/model.savedmodel": "AA=="}}, 400, "'file:"),
    ("/v2/repository/models/two/unload", {"parameters": {"unload_dependents": "yes"}}, 400, "unload_dependents"),
    ("/v2/repository/models/two/unload", {"parameters": {"force": True}}, 400, "'force'"),
    ("/v2/repository/models/two/unload", [], 400, "JSON object"),
    ("/v2/repository/index", {"ready": 1}, 400, "'ready'"),
    ("/v2/repository/index", "{not json", 400, "JSON"),
])
def test_repository_errors_name_the_problem(server, triton, path, body, status, needle):
    r = _post(server, path, data=body if isinstance(body, str) else (b"" if body is None else json.dumps(body)))
    assert r.status_code == status and needle in r.json()["error"], r.text
    assert triton.is_model_ready("two")


def test_refused_bodies_are_counted(server):
    def refused() -> float:
        text = server.http.get(server.rest + "/metrics", timeout=30).text
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "graft_requests"]
        return sum(s.value for s in family.samples if s.name == "graft_requests_total" and s.labels == {
            "model": "two", "version": "", "signature": "", "method": "predict", "protocol": "rest_v2",
            "code": "INVALID_ARGUMENT"})

    before = refused()
    assert _post(server, "/v2/models/two/infer", data="{not json").status_code == 400
    assert refused() == before + 1


def test_metrics_label_v2_requests(server, triton):
    triton.infer("two", _two_inputs())
    text = server.http.get(server.rest + "/metrics", timeout=30).text
    assert 'model="two"' in text and 'protocol="rest_v2"' in text

