"""A trunk group's life on a real server: members load and unload in any order (config reloads),
a hot swap of one member leaves the others serving, and the trunk goes with its last member.

``a`` and ``b`` share one trunk, ``c`` has its own. A bounded background load keeps
calling a model that stays configured through each step; none of its requests may fail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from graft import contract
from tests.models import export_shared_trunk_version, write_model_config
from tests.serving.server import serving

SIZE = 32
WAIT_S = 60.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("trunk_lifecycle")
    export_shared_trunk_version(root, "a", trunk_seed=1, head_seed=1, size=SIZE)
    export_shared_trunk_version(root, "b", trunk_seed=1, head_seed=2, size=SIZE, num_classes=4)
    export_shared_trunk_version(root, "c", trunk_seed=2, head_seed=3, size=SIZE)
    params = root / "batching.pbtxt"
    params.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 2000 }\n"
                      "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 100 }\n")
    return root, params


def _configure(root, models: list[str]) -> None:
    """Replace models.config atomically, so the config poller never reads half a file."""
    staging = root / "models.config.tmp"
    write_model_config(staging, {m: root / m for m in models})
    os.replace(staging, root / "models.config")


def _predict(client, model: str) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(
        np.random.RandomState(0).randint(0, 256, (1, SIZE, SIZE, 3)).astype(np.float32)))
    return tf.make_ndarray(client.predict.Predict(request, timeout=30).outputs["scores"])


class Load:
    """Calls ``model`` in a loop on one thread until stopped; counts answers and keeps failures."""

    def __init__(self, client, model: str) -> None:
        self.answers = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, model), daemon=True)
        self._thread.start()

    def _run(self, client, model: str) -> None:
        while not self._stop.is_set() and self.answers < 5000:
            try:
                _predict(client, model)
                self.answers += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
                self.failures.append(exc)

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop.set()
        self._thread.join(60)


def _until(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _members(server) -> list[list[tuple[str, int]]]:
    return sorted(group.members() for group in server.trunks.groups().values())


def _available(client) -> dict[str, list[int]]:
    listing = client.http.get(f"{client.rest}/v1/models", timeout=30).json()["models"]
    return {m["name"]: sorted(int(v["version"]) for v in m["model_version_status"] if v["state"] == "AVAILABLE")
            for m in listing}


def test_members_come_and_go_in_any_order_and_the_trunk_leaves_with_the_last(repo):
    root, params = repo
    _configure(root, ["a", "b"])
    with serving(model_config_file=str(root / "models.config"), model_config_file_poll_wait_seconds=0.2,
                 file_system_poll_wait_seconds=0.2, batching_parameters_file=str(params)) as (server, client):
        assert _members(server) == [[("a", 1), ("b", 1)]]
        trunk = server.trunks.groups().copy().popitem()[0]
        load = Load(client, "a")
        try:
            _configure(root, ["a"])                    # b leaves first
            _until(lambda: _members(server) == [[("a", 1)]], "b to leave the group")
            _configure(root, ["a", "b"])               # and comes back
            _until(lambda: _members(server) == [[("a", 1), ("b", 1)]] and _available(client).get("b") == [1],
                   "b to rejoin")
            before_swap = _predict(client, "b")
            # Hot swap of b: a version 2 with another head on the same trunk.
            export_shared_trunk_version(root, "b", trunk_seed=1, head_seed=9, size=SIZE, num_classes=4)
            _until(lambda: _members(server) == [[("a", 1), ("b", 2)]], "b's version 2 to replace version 1")
            assert not np.allclose(_predict(client, "b"), before_swap)
            _until(lambda: load.answers >= 20, "the load on a")
        finally:
            load.stop()
        assert load.failures == [] and load.answers >= 20
        load = Load(client, "b")
        try:
            _configure(root, ["b"])                    # now a leaves first
            _until(lambda: _members(server) == [[("b", 2)]], "a to leave the group")
            _configure(root, ["b", "c"])
            _until(lambda: _members(server) == [[("b", 2)], [("c", 1)]], "c to load in a group of its own")
            _until(lambda: load.answers >= 20, "the load on b")
        finally:
            load.stop()
        assert load.failures == [] and load.answers >= 20
        _configure(root, ["c"])                        # the last member of the first trunk leaves
        _until(lambda: _members(server) == [[("c", 1)]], "the first trunk to unload")
        assert trunk not in server.trunks.groups()
        assert _available(client) == {"c": [1]}
        text = client.http.get(f"{client.rest}/metrics", timeout=30).text
        sizes = {s.labels["trunk"]: s.value for f in text_string_to_metric_families(text)
                 if f.name == "graft_trunk_group_size" for s in f.samples}
        assert contract.short_fingerprint(trunk) not in sizes and list(sizes.values()) == [1.0]
