"""Shadow evaluation when stable and canary share one trunk: the canary runs only its head.

Versions 1 and 2 of ``m`` are tiny shared-trunk exports
(``tests.models.export_shared_trunk_version``) on one trunk with different heads;
version 3 of ``x`` has a trunk of its own. With ``--shared_trunks`` a mirrored
request runs the trunk once, for stable, and the canary's head on those features:
``canary_head_only`` counts it, the trunk runs only as often as the primary
requests need, and agreement equals the figure computed offline with the whole
SavedModels. A canary on another trunk runs whole. The service's ``busy`` (the
mirror runs canary work only while it is false) counts rows waiting in a trunk
group's batcher, not only in its own.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from graft import contract
from tests.models import (
    export_shared_trunk_version,
    export_tiny_cnn,
    write_model_config,
)
from tests.serving.server import serving

SIZE = 32
REQUESTS = 6


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow_trunk")
    export_shared_trunk_version(root, "m", trunk_seed=1, head_seed=1, size=SIZE)   # version 1
    export_shared_trunk_version(root, "m", trunk_seed=1, head_seed=5, size=SIZE)   # version 2: same trunk
    export_shared_trunk_version(root, "m", trunk_seed=2, head_seed=1, size=SIZE)   # version 3: another trunk
    return root


def _predict(client, batch: np.ndarray, model: str = "m", label: str = "stable") -> dict[str, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if label:
        request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch))
    response = client.predict.Predict(request, timeout=60)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _settled(client, count: int) -> dict:
    end = time.monotonic() + 60
    while True:
        shown = client.http.get(f"{client.rest}/v1/models/m/shadow", timeout=10).json()
        if shown["compared"] + shown["dropped"] + shown["canary_errors"] >= count:
            return shown
        assert time.monotonic() < end, shown
        time.sleep(0.05)


def _runs(client, part: str, version: str = "") -> float:
    text = client.http.get(f"{client.rest}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "graft_inference_seconds_count" and s.labels.get("part") == part
               and (not version or s.labels.get("version") == version))


def _classes(version_dir, batch: np.ndarray) -> np.ndarray:
    run = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    return run(images=tf.constant(batch))["class_ids"].numpy()


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "direct"])
def test_a_canary_on_stable_trunk_runs_only_its_head(tmp_path, repo, batching):
    base = repo / "m"
    contract.labels_path(base).write_text(json.dumps({"stable": 1, "canary": 2}))
    settings = {"enable_batching": True} if batching else {}
    with serving(model_base_path=str(base), model_name="m", shadow_fraction=1.0, **settings) as (graft, client):
        end = time.monotonic() + 60
        while graft.manager.labels("m") != {"stable": 1, "canary": 2}:
            assert time.monotonic() < end
            time.sleep(0.05)
        trunk_runs, head_runs = _runs(client, "trunk"), _runs(client, "head", "2")   # warmup ran both
        batches = [np.random.default_rng(i).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
                   for i in range(REQUESTS)]
        answers = [_predict(client, batch) for batch in batches]
        shown = _settled(client, REQUESTS)
        assert (shown["mirrored"], shown["compared"], shown["canary_head_only"]) == (REQUESTS, REQUESTS, REQUESTS)
        # One trunk run per primary request (each ran alone), none for the canary; its head ran each time.
        assert _runs(client, "trunk") - trunk_runs == REQUESTS
        assert _runs(client, "head", "2") - head_runs == REQUESTS
        # The client's answer carries no trunk features.
        assert set(answers[0]) == {"scores", "class_ids", "class_names"}
    sent = np.concatenate(batches)
    stable, canary = _classes(base / "1", sent), _classes(base / "2", sent)
    assert shown["rows"] == len(sent) and shown["agreed_rows"] == int(np.count_nonzero(stable == canary))
    for batch, answer in zip(batches, answers):
        np.testing.assert_array_equal(answer["class_ids"], _classes(base / "1", batch))


def test_a_canary_on_another_trunk_runs_whole(repo):
    base = repo / "m"
    contract.labels_path(base).write_text(json.dumps({"stable": 1, "canary": 3}))
    with serving(model_base_path=str(base), model_name="m", shadow_fraction=1.0, enable_batching=True) as (graft, client):
        end = time.monotonic() + 60
        while graft.manager.labels("m") != {"stable": 1, "canary": 3}:
            assert time.monotonic() < end
            time.sleep(0.05)
        for i in range(3):
            _predict(client, np.random.default_rng(50 + i).uniform(0, 255, (1, SIZE, SIZE, 3)).astype(np.float32))
        shown = _settled(client, 3)
    assert (shown["compared"], shown["canary_head_only"], shown["canary_errors"]) == (3, 0, 0)


def test_rows_queued_in_a_trunk_batcher_make_the_service_busy(tmp_path):
    # A long batch timeout holds a lone row in its batcher, waiting for company: queued,
    # deterministically, for that long.
    export_shared_trunk_version(tmp_path, "s", trunk_seed=1, head_seed=1, size=SIZE)
    export_tiny_cnn(tmp_path / "plain" / "1", size=SIZE)  # declares no trunk: the service's own batcher
    config = write_model_config(tmp_path / "models.config", {"s": tmp_path / "s", "plain": tmp_path / "plain"})
    params = tmp_path / "batching.pbtxt"
    params.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 3000000 }\n"
                      "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 10 }\n")
    image = np.random.default_rng(7).uniform(0, 255, (1, SIZE, SIZE, 3)).astype(np.float32)
    with serving(model_config_file=str(config), batching_parameters_file=str(params)) as (graft, client):
        assert graft.trunks is not None and len(graft.trunks.groups()) == 1
        _predict(client, image, "plain", "")   # the service's own batcher exists, and is empty again
        assert not graft.service.busy()
        answers = []
        sender = threading.Thread(target=lambda: answers.append(_predict(client, image, "s", "")))
        sender.start()
        seen = []
        while sender.is_alive() and not seen:
            if graft.service.busy():
                seen.append(graft.trunks.queued_rows())
            time.sleep(0.01)
        sender.join(30)
        assert seen == [1], "busy() never saw the row queued in the trunk group's batcher"
        assert answers and answers[0]["scores"].shape == (1, 3)
        assert graft.trunks.queued_rows() == 0 and not graft.service.busy()
