"""Shared-trunk serving against real servers: answers, mixed trunk batches, the model list, metrics.

Three tiny exported models (``tests.models.export_shared_trunk_version``): ``a`` and
``b`` share one trunk (different heads, 3 and 4 classes), ``c`` has a trunk of its
own. One server runs with ``--shared_trunks`` on and batching, one with it off and
no batching; every protocol's answer from the first must equal the second's within
1e-4, the second being exactly today's standalone serving.
"""

from __future__ import annotations

import base64
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    classification_pb2,
    inference_pb2,
    input_pb2,
    predict_pb2,
)

from graft import contract
from serving.servable import Servable
from tests.models import (
    export_shared_trunk_version,
    export_tiny_cnn,
    image_example,
    png_bytes,
    write_model_config,
)
from tests.serving.server import serving

SIZE = 32
MODELS = ("a", "b", "c")
TOL = 1e-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_trunk_repo")
    export_shared_trunk_version(root, "a", trunk_seed=1, head_seed=1, size=SIZE, num_classes=3)
    export_shared_trunk_version(root, "b", trunk_seed=1, head_seed=2, size=SIZE, num_classes=4)
    export_shared_trunk_version(root, "c", trunk_seed=2, head_seed=3, size=SIZE, num_classes=3)
    export_tiny_cnn(root / "plain" / "1", size=SIZE)  # declares no trunk: loads whole
    params = root / "batching.pbtxt"
    params.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 30000 }\n"
                      "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 100 }\n")
    config = write_model_config(root / "models.config", {m: root / m for m in (*MODELS, "plain")})
    return root, config, params


@pytest.fixture(scope="module")
def shared(repo):
    _, config, params = repo
    with serving(model_config_file=str(config), batching_parameters_file=str(params)) as running:
        yield running


@pytest.fixture(scope="module")
def standalone(repo):
    _, config, _ = repo
    with serving(model_config_file=str(config), shared_trunks=False) as running:
        yield running


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


def _grpc_predict(client, model: str, images: np.ndarray) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    response = client.predict.Predict(request, timeout=60)
    return tf.make_ndarray(response.outputs["scores"])


def _rest_predict(client, model: str, images: np.ndarray) -> np.ndarray:
    body = {"instances": images.tolist()}
    answer = client.http.post(f"{client.rest}/v1/models/{model}:predict", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return np.array([p["scores"] for p in answer.json()["predictions"]], dtype=np.float32)


def _rest_predict_bytes(client, model: str, images: np.ndarray) -> np.ndarray:
    body = {"signature_name": "predict_images",
            "instances": [{"image_bytes": {"b64": base64.b64encode(png_bytes(i)).decode()}} for i in images]}
    answer = client.http.post(f"{client.rest}/v1/models/{model}:predict", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return np.array([p["scores"] for p in answer.json()["predictions"]], dtype=np.float32)


def _grpc_classify(client, model: str, images: np.ndarray) -> np.ndarray:
    examples = [image_example(png_bytes(image)) for image in images]
    request = classification_pb2.ClassificationRequest(
        input=input_pb2.Input(example_list=input_pb2.ExampleList(examples=examples)))
    request.model_spec.name = model
    request.model_spec.signature_name = "classify"
    response = client.predict.Classify(request, timeout=60)
    return np.array([[c.score for c in row.classes] for row in response.result.classifications], dtype=np.float32)


def _v2_infer(server, model: str, images: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        given = grpcclient.InferInput("images", list(images.shape), "FP32")
        given.set_data_from_numpy(images)
        return client.infer(model, [given]).as_numpy("scores")
    finally:
        client.close()


CALLS = {
    "rest": lambda server, client, model, images: _rest_predict(client, model, images),
    "rest_bytes": lambda server, client, model, images: _rest_predict_bytes(client, model, images),
    "grpc": lambda server, client, model, images: _grpc_predict(client, model, images),
    "grpc_classify": lambda server, client, model, images: _grpc_classify(client, model, images),
    "v2_grpc": lambda server, client, model, images: _v2_infer(server, model, images),
}


def _metrics(client) -> dict:
    text = client.http.get(f"{client.rest}/metrics", timeout=30).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(families: dict, family: str, sample: str, **labels) -> list:
    return [s for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]


def test_the_shared_models_load_as_one_group_and_c_alone(shared):
    server, _ = shared
    groups = server.trunks.groups()
    assert sorted(sorted(g.members()) for g in groups.values()) == [[("a", 1), ("b", 1)], [("c", 1)]]


@pytest.mark.parametrize("protocol", sorted(CALLS))
def test_every_protocol_answers_as_the_standalone_version(shared, standalone, protocol):
    call = CALLS[protocol]
    images = _images(3, seed=len(protocol))
    for model in MODELS:
        got = call(shared[0], shared[1], model, images)
        want = call(standalone[0], standalone[1], model, images)
        assert got.shape == want.shape == (3, 4 if model == "b" else 3)
        np.testing.assert_allclose(got, want, atol=TOL)
        # Scores vary with the input, so a wrong row could not pass by accident.
        assert np.ptp(want, axis=0).max() > 1e-3


def test_rows_of_different_models_share_trunk_runs_and_come_back_right(shared, standalone):
    server, client = shared
    images = {model: _images(2, seed=10 + i) for i, model in enumerate(("a", "b"))}
    want = {model: _grpc_predict(standalone[1], model, x) for model, x in images.items()}
    before = _metrics(client)
    sig = {"trunk": contract.short_fingerprint(next(iter(
        g.fingerprint for g in server.trunks.groups().values() if g.size == 2))), "signature": "images"}
    multi_before = sum(s.value for s in _samples(before, "graft_trunk_batch_models",
                                                 "graft_trunk_batch_models_bucket", le="1.0", **sig))
    total_before = sum(s.value for s in _samples(before, "graft_trunk_batch_models",
                                                 "graft_trunk_batch_models_count", **sig))
    failures: list[BaseException] = []
    got: dict[tuple[str, int], np.ndarray] = {}
    start = threading.Barrier(8)

    def one(model: str, index: int) -> None:
        try:
            start.wait(30)
            got[(model, index)] = _grpc_predict(client, model, images[model])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(model, i)) for model in ("a", "b") for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    for (model, _), scores in got.items():
        np.testing.assert_allclose(scores, want[model], atol=TOL)
    after = _metrics(client)
    runs = sum(s.value for s in _samples(after, "graft_trunk_batch_models", "graft_trunk_batch_models_count",
                                         **sig)) - total_before
    single = sum(s.value for s in _samples(after, "graft_trunk_batch_models", "graft_trunk_batch_models_bucket",
                                           le="1.0", **sig)) - multi_before
    # Eight requests arrived together within one batch timeout: at least one trunk run carried both models.
    assert runs >= 1 and single < runs, (runs, single)


def test_the_model_list_shows_each_versions_trunk(shared, standalone):
    def trunks(client) -> dict:
        listing = client.http.get(f"{client.rest}/v1/models", timeout=30).json()
        versions = {m["name"]: m["model_version_status"][0] for m in listing["models"]}
        assert "trunk" not in versions.pop("plain").get("graft", {})
        return {name: version["graft"]["trunk"] for name, version in versions.items()}

    on, off = trunks(shared[1]), trunks(standalone[1])
    assert on["a"]["fingerprint"] == on["b"]["fingerprint"] != on["c"]["fingerprint"]
    assert len(on["a"]["fingerprint"]) == 64
    for listing, shared_flag in ((on, True), (off, False)):
        assert {m: (t["shared"], t["group_size"]) for m, t in listing.items()} == {
            "a": (shared_flag, 2), "b": (shared_flag, 2), "c": (shared_flag, 1)}


def test_trunk_and_head_runs_are_measured_under_short_fingerprints(shared):
    server, client = shared
    _grpc_predict(client, "a", _images(1, seed=3))
    families = _metrics(client)
    sizes = {s.labels["trunk"]: s.value for s in families["graft_trunk_group_size"].samples}
    fingerprints = {g.fingerprint: g.size for g in server.trunks.groups().values()}
    assert sizes == {contract.short_fingerprint(f): float(n) for f, n in fingerprints.items()}
    assert all(len(label) < 64 for label in sizes)
    trunk_runs = _samples(families, "graft_inference_seconds", "graft_inference_seconds_count", part="trunk")
    head_runs = _samples(families, "graft_inference_seconds", "graft_inference_seconds_count", part="head",
                         model="a")
    assert trunk_runs and head_runs and all(s.value >= 1 for s in trunk_runs + head_runs)
    assert _samples(families, "graft_trunk_batch_size", "graft_trunk_batch_size_count")


def _multi_inference(client, models: list[str], images: np.ndarray):
    examples = [image_example(png_bytes(image)) for image in images]
    request = inference_pb2.MultiInferenceRequest(
        input=input_pb2.Input(example_list=input_pb2.ExampleList(examples=examples)))
    for model in models:
        task = request.tasks.add()
        task.model_spec.name = model
        task.model_spec.signature_name = "classify"
        task.method_name = contract.CLASSIFY_METHOD
    return client.predict.MultiInference(request, timeout=60)


def test_multi_inference_fans_out_to_models_sharing_a_trunk_with_one_trunk_pass(shared, standalone):
    server, client = shared
    images = _images(2, seed=21)
    group = next(g for g in server.trunks.groups().values() if g.size == 2)
    sig = {"trunk": group.short, "signature": "examples"}
    before = _metrics(client)
    response = _multi_inference(client, ["a", "b"], images)
    after = _metrics(client)
    got = {r.model_spec.name: np.array([[c.score for c in row.classes]
                                        for row in r.classification_result.classifications]) for r in response.results}
    assert [r.model_spec.name for r in response.results] == ["a", "b"]
    for model in ("a", "b"):
        np.testing.assert_allclose(got[model], _grpc_classify(standalone[1], model, images), atol=TOL)
    # One trunk run carried both heads' rows.
    count = "graft_trunk_batch_models_count"
    assert (sum(s.value for s in _samples(after, "graft_trunk_batch_models", count, **sig))
            - sum(s.value for s in _samples(before, "graft_trunk_batch_models", count, **sig))) == 1


def test_multi_inference_refuses_models_on_different_trunks(shared):
    _, client = shared
    with pytest.raises(grpc.RpcError) as caught:
        _multi_inference(client, ["a", "c"], _images(1, seed=22))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "share one loaded trunk" in caught.value.details()


def test_multi_inference_across_models_is_refused_without_sharing(standalone):
    _, client = standalone
    with pytest.raises(grpc.RpcError) as caught:
        _multi_inference(client, ["a", "b"], _images(1, seed=23))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not run a shared trunk" in caught.value.details()


def test_the_rest_fan_out_equals_each_models_own_answer(shared, standalone):
    _, client = shared
    images = _images(3, seed=24)
    body = {"models": ["b", {"name": "a", "version": 1}], "instances": images.tolist()}
    answer = client.http.post(f"{client.rest}/v1/trunks:fanout", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [(r["model"], r["version"]) for r in results] == [("b", "1"), ("a", "1")]
    for result in results:
        got = np.array([p["scores"] for p in result["predictions"]], dtype=np.float32)
        np.testing.assert_allclose(got, _rest_predict(standalone[1], result["model"], images), atol=TOL)


@pytest.mark.parametrize(("body", "reason"), [
    ({"models": ["a", "c"], "instances": [[[[0.0] * 3] * SIZE] * SIZE]}, "share one loaded trunk"),
    ({"models": [], "instances": []}, "'models' must be a non-empty list"),
    ({"models": [{"name": "a", "version": 1, "label": "x"}], "instances": []}, "cannot both be specified"),
])
def test_the_rest_fan_out_refuses_what_it_cannot_answer(shared, body, reason):
    _, client = shared
    answer = client.http.post(f"{client.rest}/v1/trunks:fanout", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert reason in answer.json()["error"]


def test_a_version_without_a_declared_trunk_loads_whole_beside_the_groups(shared, standalone):
    server, client = shared
    with server.manager.acquire("plain") as plain:
        assert type(plain) is Servable
    assert standalone[0].trunks is None
    images = _images(2, seed=25)
    body = {"instances": images.tolist()}
    got = client.http.post(f"{client.rest}/v1/models/plain:predict", json=body, timeout=60).json()
    want = standalone[1].http.post(f"{standalone[1].rest}/v1/models/plain:predict", json=body, timeout=60).json()
    np.testing.assert_allclose(got["predictions"], want["predictions"], atol=TOL)


def test_each_member_counts_its_executions_in_its_statistics(shared):
    _, client = shared
    def executions(model: str) -> int:
        stats = client.http.get(f"{client.rest}/v2/models/{model}/stats", timeout=30).json()
        return stats["model_stats"][0]["execution_count"]

    before = {model: executions(model) for model in ("a", "b")}
    _grpc_predict(client, "a", _images(2, seed=26))
    _grpc_predict(client, "b", _images(1, seed=27))
    _grpc_predict(client, "b", _images(1, seed=28))
    assert executions("a") - before["a"] == 1
    assert executions("b") - before["b"] == 2


def test_concurrent_fan_outs_and_single_model_requests_share_trunk_runs(shared, standalone):
    server, client = shared
    group = next(g for g in server.trunks.groups().values() if g.size == 2)
    sig = {"trunk": group.short, "signature": "examples"}
    images = {i: _images(1, seed=40 + i) for i in range(6)}
    count = "graft_trunk_batch_models_count"
    before = sum(s.value for s in _samples(_metrics(client), "graft_trunk_batch_models", count, **sig))
    failures: list[BaseException] = []
    fanned: dict[int, dict] = {}
    alone: dict[int, np.ndarray] = {}
    start = threading.Barrier(6)

    def fan(index: int) -> None:
        try:
            start.wait(30)
            response = _multi_inference(client, ["a", "b"], images[index])
            fanned[index] = {r.model_spec.name: np.array([[c.score for c in row.classes]
                                                          for row in r.classification_result.classifications])
                             for r in response.results}
        except BaseException as exc:  # reported below
            failures.append(exc)

    def single(index: int) -> None:
        try:
            start.wait(30)
            alone[index] = _grpc_classify(client, "b", images[index])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=fan, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=single, args=(i,)) for i in (4, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    for index, answers in fanned.items():
        for model in ("a", "b"):
            np.testing.assert_allclose(answers[model], _grpc_classify(standalone[1], model, images[index]), atol=TOL)
    for index, scores in alone.items():
        np.testing.assert_allclose(scores, _grpc_classify(standalone[1], "b", images[index]), atol=TOL)
    runs = sum(s.value for s in _samples(_metrics(client), "graft_trunk_batch_models", count, **sig)) - before
    # Six requests arrived together within one batch timeout. Fan-outs that ran the trunk
    # alone would make at least five runs (four fan-outs, the two single requests together).
    assert 1 <= runs <= 4, runs


def test_a_group_of_one_runs_trunk_and_head_as_one_call(shared, standalone):
    server, client = shared
    group = next(g for g in server.trunks.groups().values() if g.members() == [("c", 1)])
    labels = {"model": "c", "part": "model", "trunk": group.short, "signature": "serving_default"}
    sample = "graft_inference_seconds_count"
    before = _metrics(client)
    composed = sum(s.value for s in _samples(before, "graft_inference_seconds", sample, **labels))
    split = sum(s.value for s in _samples(before, "graft_inference_seconds", sample, part="head", model="c"))
    images = _images(3, seed=50)
    np.testing.assert_allclose(_grpc_predict(client, "c", images), _grpc_predict(standalone[1], "c", images),
                               atol=TOL)
    after = _metrics(client)
    assert sum(s.value for s in _samples(after, "graft_inference_seconds", sample, **labels)) - composed == 1
    assert sum(s.value for s in _samples(after, "graft_inference_seconds", sample, part="head", model="c")) == split
