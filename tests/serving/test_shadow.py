"""Shadow evaluation against a real graft-serve: which requests are mirrored, the figures, the hard rules.

Each test serves one model ``m`` with a ``stable`` and a ``canary`` label
(labels.json) and ``--shadow_fraction``; clients are the TF Serving gRPC stubs,
REST and V2 (tritonclient's gRPC stub and REST JSON). Expected figures are
computed offline on the same inputs with the SavedModels loaded by TensorFlow.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as triton_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import classification_pb2, predict_pb2

from graft import contract
from serving.runtime.settings import ServerConfig
from serving.shadow import ShadowMirror, js_divergence
from tests import models
from tests.serving.server import serving

SIZE = 32
SLOW_CANARY_S = 2.0


def export_slow_model(path: Path, seconds: float, size: int = SIZE) -> None:
    """A classifier like the tiny CNN's signature whose every run first sleeps ``seconds`` without using a CPU.

    The sleep is tf.data's SleepDataset: a canary that hangs, as far as a request's time scale goes.
    """
    class Slow(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        def serve(self, images):
            dataset = tf.data.Dataset.from_tensors(images)
            variant = tf.raw_ops.SleepDataset(
                input_dataset=tf.data.experimental.to_variant(dataset),
                sleep_microseconds=tf.constant(int(seconds * 1e6), tf.int64),
                output_types=[tf.float32], output_shapes=[tf.TensorShape([None, size, size, 3])])
            slept = tf.data.experimental.from_variant(variant, dataset.element_spec).get_single_element()
            return {"output_0": tf.nn.softmax(tf.reduce_mean(slept, axis=[1, 2]))}

    module = Slow()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


@pytest.fixture(scope="module")
def other_cnn(tmp_path_factory) -> Path:
    """A tiny CNN with other random weights: a deliberately different canary."""
    path = tmp_path_factory.mktemp("other_cnn") / "savedmodel"
    models.export_tiny_cnn(path, size=SIZE, num_classes=3, seed=7)
    return path


@pytest.fixture(scope="module")
def wide_cnn(tmp_path_factory) -> Path:
    """A tiny CNN on 48 px images: every mirrored 32 px request fails on it."""
    path = tmp_path_factory.mktemp("wide_cnn") / "savedmodel"
    models.export_tiny_cnn(path, size=48, num_classes=3, seed=1)
    return path


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "savedmodel"
    export_slow_model(path, SLOW_CANARY_S)
    return path


@pytest.fixture(scope="module")
def quick_slow_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quick_slow") / "savedmodel"
    export_slow_model(path, 0.3)
    return path


def make_repo(root: Path, versions: dict[int, Path], labels: dict[str, int]) -> Path:
    base = root / "m"
    for number, src in versions.items():
        models.install_version(src, base, number)
    contract.labels_path(base).write_text(json.dumps(labels))
    return base


def wait_labels(graft, labels: dict[str, int], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while graft.manager.labels("m") != labels:
        assert time.monotonic() < end, f"labels stayed {graft.manager.labels('m')}, wanted {labels}"
        time.sleep(0.05)


def report(client) -> dict:
    r = client.http.get(f"{client.rest}/v1/models/m/shadow", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def settled(client, timeout: float = 60.0) -> dict:
    """The report once every mirrored request is accounted for (compared, dropped or failed)."""
    end = time.monotonic() + timeout
    while True:
        shown = report(client)
        if shown["mirrored"] == shown["compared"] + shown["dropped"] + shown["canary_errors"]:
            return shown
        assert time.monotonic() < end, f"mirrored work never settled: {shown}"
        time.sleep(0.05)


def images(seed: int, rows: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (rows, SIZE, SIZE, 3)).astype(np.float32)


def grpc_predict(client, batch: np.ndarray, label: str | None = "stable", version: int | None = None) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    if label is not None:
        request.model_spec.version_label = label
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch))
    response = client.predict.Predict(request, timeout=30)
    return tf.make_ndarray(response.outputs["output_0"])


def offline(path: Path, batch: np.ndarray) -> np.ndarray:
    return tf.saved_model.load(str(path)).signatures["serving_default"](images=tf.constant(batch))["output_0"].numpy()


def histogram(classes: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(classes, return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


def test_a_copy_of_stable_agrees_fully_over_every_protocol(tmp_path, tiny_cnn_savedmodel):
    # stable is the newest version, so a request with no version is answered by stable and mirrored too.
    make_repo(tmp_path, {1: tiny_cnn_savedmodel, 2: tiny_cnn_savedmodel}, {"stable": 2, "canary": 1})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m", shadow_fraction=1.0,
                 enable_batching=True) as (graft, client):
        wait_labels(graft, {"stable": 2, "canary": 1})
        assert report(client)["mirrored"] == 0
        batches = [images(seed) for seed in range(8)]
        for batch in batches[:2]:
            grpc_predict(client, batch)                       # /labels/stable over gRPC
        grpc_predict(client, batches[2], label=None)          # no version: stable answers
        for path in ("/v1/models/m/labels/stable:predict", "/v1/models/m:predict"):
            r = client.http.post(client.rest + path, json={"instances": batches[3].tolist()}, timeout=30)
            assert r.status_code == 200, r.text
        r = client.http.post(client.rest + "/v2/models/m/infer", timeout=30, json={"inputs": [
            {"name": "images", "shape": list(batches[5].shape), "datatype": "FP32",
             "data": batches[5].ravel().tolist()}]})
        assert r.status_code == 200, r.text
        v2 = triton_grpc.InferenceServerClient(f"127.0.0.1:{client.grpc_port}")
        tensor = triton_grpc.InferInput("images", list(batches[6].shape), "FP32")
        tensor.set_data_from_numpy(batches[6])
        v2.infer("m", [tensor], model_version="stable")
        v2.close()
        # Addressed to a version by number, or to canary: never mirrored.
        grpc_predict(client, batches[7], label=None, version=2)
        grpc_predict(client, batches[7], label="canary")

        shown = settled(client)
        assert (shown["stable"], shown["canary"], shown["fraction"]) == (2, 1, 1.0)
        assert (shown["mirrored"], shown["compared"], shown["dropped"], shown["canary_errors"]) == (7, 7, 0, 0)
        assert shown["agreement"] == 1.0 and shown["rows"] == 14 and shown["agreed_rows"] == 14
        assert shown["js_divergence"] == 0.0
        sent = np.concatenate([batches[i] for i in (0, 1, 2, 3, 3, 5, 6)])
        expected = histogram(np.argmax(offline(tiny_cnn_savedmodel, sent), axis=1))
        assert shown["class_histogram"] == {"stable": expected, "canary": expected}
        for side in ("stable", "canary"):
            assert 0 < shown["latency_ms"][side]["p50"] <= shown["latency_ms"][side]["p99"]
        assert shown["since"].endswith("Z") and shown["since"][:4].isdigit()

        text = client.http.get(client.rest + "/metrics", timeout=10).text
        samples = {(s.name, s.labels.get("model"), s.labels.get("stable_version"), s.labels.get("canary_version")):
                   s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name.startswith("graft_shadow_")}
        for name in ("mirrored", "compared", "dropped", "canary_errors"):
            assert samples[(f"graft_shadow_{name}_total", "m", "2", "1")] == shown[name]
        assert samples[("graft_shadow_agreement", "m", "2", "1")] == 1.0


def test_a_different_canary_gives_its_offline_agreement(tmp_path, tiny_cnn_savedmodel, other_cnn):
    make_repo(tmp_path, {1: tiny_cnn_savedmodel, 2: other_cnn}, {"stable": 1, "canary": 2})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m", shadow_fraction=0.5) as (graft, client):
        wait_labels(graft, {"stable": 1, "canary": 2})
        batches = [images(100 + i, rows=3) for i in range(12)]
        for batch in batches:
            grpc_predict(client, batch)
        shown = settled(client)
    # The counter mirrors request n (from 1) when floor(n / 2) steps: the 2nd, 4th, ... request.
    mirrored = np.concatenate(batches[1::2])
    stable = np.argmax(offline(tiny_cnn_savedmodel, mirrored), axis=1)
    canary = np.argmax(offline(other_cnn, mirrored), axis=1)
    agreed = int(np.count_nonzero(stable == canary))
    assert 0 < agreed < len(stable), "the test pair must disagree on some rows and agree on others"
    assert (shown["mirrored"], shown["compared"], shown["rows"], shown["agreed_rows"]) == (6, 6, 18, agreed)
    assert shown["agreement"] == agreed / 18
    assert shown["class_histogram"] == {"stable": histogram(stable), "canary": histogram(canary)}
    assert shown["js_divergence"] == pytest.approx(js_divergence(histogram(stable), histogram(canary)), abs=1e-12)


def test_classify_is_mirrored_and_other_outputs_get_a_mean_difference(tmp_path, two_input_savedmodel):
    make_repo(tmp_path, {1: two_input_savedmodel, 2: two_input_savedmodel}, {"stable": 1, "canary": 2})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m", shadow_fraction=1.0) as (graft, client):
        wait_labels(graft, {"stable": 1, "canary": 2})
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name, request.model_spec.version_label = "m", "stable"
        request.model_spec.signature_name = "classify"
        request.input.example_list.examples.extend([models.make_example([1, 2, 3]), models.make_example([-3, 0, 1])])
        client.predict.Classify(request, timeout=30)
        shown = settled(client)
        assert (shown["compared"], shown["rows"], shown["agreement"]) == (1, 2, 1.0)
        # Predict on outputs that are no classifier's (y, tag_len): the mean absolute difference.
        r = client.http.post(client.rest + "/v1/models/m/labels/stable:predict", timeout=30,
                             json={"inputs": {"x": [[1.0, 2.0, 3.0]], "tag": ["abc"]}})
        assert r.status_code == 200, r.text
        end = time.monotonic() + 30
        while (shown := settled(client))["compared"] < 2:
            assert time.monotonic() < end, shown
            time.sleep(0.05)
        assert shown["mean_abs_diff"] == 0.0 and shown["rows"] == 2


def test_a_failing_canary_never_reaches_the_client(tmp_path, tiny_cnn_savedmodel, wide_cnn):
    make_repo(tmp_path, {1: tiny_cnn_savedmodel, 2: wide_cnn}, {"stable": 1, "canary": 2})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m", shadow_fraction=1.0) as (graft, client):
        wait_labels(graft, {"stable": 1, "canary": 2})
        batches = [images(200 + i) for i in range(5)]
        answers = [grpc_predict(client, batch) for batch in batches]
        shown = settled(client)
    for batch, answer in zip(batches, answers):
        np.testing.assert_allclose(answer, offline(tiny_cnn_savedmodel, batch), rtol=1e-5, atol=1e-6)
    assert (shown["mirrored"], shown["compared"], shown["canary_errors"]) == (5, 0, 5)
    assert shown["agreement"] is None


def test_a_hanging_canary_delays_no_primary_request(tmp_path, tiny_cnn_savedmodel, slow_model):
    make_repo(tmp_path, {1: tiny_cnn_savedmodel, 2: slow_model}, {"stable": 1, "canary": 2})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m", shadow_fraction=1.0) as (graft, client):
        wait_labels(graft, {"stable": 1, "canary": 2})
        batch = images(300)
        expected = offline(tiny_cnn_savedmodel, batch)

        def timed(label, version):
            start = time.perf_counter()
            answer = grpc_predict(client, batch, label=label, version=version)
            return time.perf_counter() - start, answer

        with ThreadPoolExecutor(8) as pool:
            baseline = [s for s, _ in pool.map(lambda _: timed(None, 1), range(48))]   # by number: not mirrored
            mirrored = list(pool.map(lambda _: timed("stable", None), range(120)))
        shown = report(client)
    for _, answer in mirrored:
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)
    seconds = sorted(s for s, _ in mirrored)
    # No request waited for a canary run (each sleeps SLOW_CANARY_S), and the bulk kept its pace.
    assert seconds[-1] < SLOW_CANARY_S / 2
    assert np.percentile(seconds, 50) < 3 * np.percentile(baseline, 50) + 0.05
    # At most one run and one queue's worth were taken; the rest was shed, and counted.
    assert shown["mirrored"] == 120
    assert shown["dropped"] >= 120 - 64 - 2 and shown["compared"] <= 2


def test_a_label_move_resets_the_window_and_an_unload_loses_nothing(tmp_path, tiny_cnn_savedmodel, quick_slow_model):
    base = make_repo(tmp_path, {1: tiny_cnn_savedmodel, 2: quick_slow_model, 3: tiny_cnn_savedmodel},
                     {"stable": 1, "canary": 2})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m", shadow_fraction=1.0,
                 file_system_poll_wait_seconds=0.1) as (graft, client):
        wait_labels(graft, {"stable": 1, "canary": 2})
        with graft.manager.acquire("m", 2) as servable:
            canary_ref = weakref.ref(servable)
        del servable
        batches = [images(400 + i) for i in range(12)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(grpc_predict, [client] * len(batches), batches))
        first = report(client)
        old = graft.shadow.window("m")
        assert first["mirrored"] == 12 and graft.shadow.pending() > 0, "the move must come while work is queued"

        contract.labels_path(base).write_text(json.dumps({"stable": 1, "canary": 3}))
        wait_labels(graft, {"stable": 1, "canary": 3})
        moved = report(client)
        assert (moved["canary"], moved["mirrored"], moved["compared"]) == (3, 0, 0)
        assert moved["since"] > first["since"]

        end = time.monotonic() + 60
        while old.mirrored != old.compared + old.dropped + old.canary_errors or graft.manager.status("m", 2)[0].state != "END":
            assert time.monotonic() < end, (old, graft.manager.status("m", 2))
            time.sleep(0.05)
        # Runs already started finished on version 2; the rest found it gone and were counted as dropped.
        assert old.mirrored == 12 and old.dropped > 0 and old.canary_errors == 0
        gc.collect()
        assert canary_ref() is None, "the unloaded canary is still referenced"
        assert graft.shadow.pending() == 0
        assert sum(t.name.startswith("graft-shadow") for t in threading.enumerate()) == 1

        for batch in batches[:3]:
            grpc_predict(client, batch)
        after = settled(client)
        assert (after["canary"], after["compared"], after["agreement"]) == (3, 3, 1.0)
    for batch, answer in zip(batches, answers):
        np.testing.assert_allclose(answer, offline(tiny_cnn_savedmodel, batch), rtol=1e-5, atol=1e-6)


def test_the_route_without_shadow_or_labels(tmp_path, tiny_cnn_savedmodel):
    make_repo(tmp_path, {1: tiny_cnn_savedmodel}, {"stable": 1})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m") as (graft, client):
        wait_labels(graft, {"stable": 1})
        grpc_predict(client, images(1))
        shown = report(client)
        assert (shown["stable"], shown["canary"], shown["fraction"], shown["mirrored"]) == (1, None, 0.0, 0)
        assert shown["since"] is None
        r = client.http.get(client.rest + "/v1/models/nope/shadow", timeout=10)
        assert r.status_code == 404 and "nope" in r.json()["error"]


def test_the_fraction_is_checked():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--shadow_fraction must be within 0..1"):
            ServerConfig(model_base_path="/m", shadow_fraction=bad)


def test_mirrored_work_waits_for_a_quiet_moment_and_is_shed_otherwise(tmp_path, tiny_cnn_savedmodel):
    make_repo(tmp_path, {1: tiny_cnn_savedmodel, 2: tiny_cnn_savedmodel}, {"stable": 1, "canary": 2})
    with serving(model_base_path=str(tmp_path / "m"), model_name="m") as (graft, _):
        wait_labels(graft, {"stable": 1, "canary": 2})
        batch = images(500)
        outputs = {"output_0": offline(tiny_cnn_savedmodel, batch)}
        busy = threading.Event()
        busy.set()
        mirror = ShadowMirror(graft.manager, 1.0, busy=busy.is_set)
        try:
            mirror.offer("m", None, "stable", 1, "serving_default", {"images": batch}, outputs, 0.01)
            end = time.monotonic() + 30
            while mirror.report("m")["dropped"] < 1:
                assert time.monotonic() < end, mirror.report("m")
                time.sleep(0.02)
            busy.clear()   # the primary traffic leaves room: the next one runs
            mirror.offer("m", None, "stable", 1, "serving_default", {"images": batch}, outputs, 0.01)
            while mirror.report("m")["compared"] < 1:
                assert time.monotonic() < end, mirror.report("m")
                time.sleep(0.02)
            shown = mirror.report("m")
            assert (shown["mirrored"], shown["dropped"], shown["compared"], shown["agreement"]) == (2, 1, 1, 1.0)
            # Neither a version addressed by number nor one that is not stable's is mirrored.
            mirror.offer("m", 1, None, 1, "serving_default", {"images": batch}, outputs, 0.01)
            mirror.offer("m", None, None, 2, "serving_default", {"images": batch}, outputs, 0.01)
            assert mirror.report("m")["mirrored"] == 2
        finally:
            mirror.close()
        # The server's own mirror (fraction 0) has no thread; this one's ended with close().
        assert not [t for t in threading.enumerate() if t.name.startswith("graft-shadow")]
