"""Faults while serving: versions deleted or corrupt, failed loads, bad labels, SIGTERM under load.

Every test runs a real graft-serve on 127.0.0.1 (in-process, or a subprocess for
signals) over real SavedModels, breaks something on disk or in the process, and
checks what clients see: requests keep being answered correctly by a version that
works, or get a clear NOT_FOUND; errors show in the REST status API, in /metrics
and in the log. SIGKILL of ``graft-train promote`` at every step is covered in
tests/training/test_promote.py (test_sigkill_at_any_step_leaves_the_repository_consistent
and test_sigkill_at_random_times_leaves_the_repository_consistent).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from tests import models
from tests.ports import free_port
from tests.serving.server import Client, Subprocess, serving

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
EXPECTED = models.two_input_expected(X)
POLL = "0.1"   # --file_system_poll_wait_seconds: faults are noticed within a few polls


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` until it is truthy (and return it); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _request(version: int | None = None, label: str | None = None) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "two"
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    request.inputs["tag"].CopyFrom(tf.make_tensor_proto(np.array([b"a", b"bc"], dtype=object)))
    return request


def predict_version(client: Client, **spec) -> int:
    """Predict on model "two", check the answer, return the version that served it."""
    response = client.predict.Predict(_request(**spec), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), EXPECTED, atol=1e-5)
    return response.model_spec.version.value


class Load:
    """Client threads sending Predicts back to back; every failure is recorded, none raised."""

    def __init__(self, client: Client, threads: int = 2):
        self.client = client
        self.versions: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.versions.append(predict_version(self.client))
            except Exception as exc:  # counted and asserted on by the test
                self.failures.append(repr(exc))

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        wait_for(lambda: len(self.versions) >= 5 or self.failures, what="load to start")
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def rest_status(client: Client, path: str = "") -> dict[int, dict]:
    """Version -> TF Serving status entry, from GET /v1/models/two[path]."""
    r = client.http.get(f"{client.rest}/v1/models/two{path}", timeout=10)
    assert r.status_code == 200, r.text
    return {int(s["version"]): s for s in r.json()["model_version_status"]}


def load_failures(client: Client, model: str = "two") -> float:
    """graft_model_load_failures_total{model=...} from /metrics."""
    text = client.http.get(f"{client.rest}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "graft_model_load_failures_total" and sample.labels.get("model") == model:
                return sample.value
    return 0.0


def _settings(base: Path) -> dict:
    return {"model_name": "two", "model_base_path": str(base), "file_system_poll_wait_seconds": float(POLL)}


def _broken_copy(src: Path, dst: Path, part: str) -> Path:
    """A copy of the SavedModel ``src`` at ``dst`` with ``part`` ("variables" or "graph") corrupted."""
    shutil.copytree(src, dst)
    if part == "variables":
        for f in (dst / "variables").glob("variables.data-*"):
            f.write_bytes(os.urandom(f.stat().st_size))   # same size: only the content is wrong
    else:
        (dst / "saved_model.pb").write_bytes(b"\x08\x01 not a SavedModel at all")
    return dst


def _write_atomically(path: Path, text: str) -> None:
    # The way promotion writes labels.json: a poll must never read a half-written file.
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- faults


def test_deleted_version_dir_previous_version_takes_over_then_not_found(tmp_path, two_input_savedmodel):
    base = tmp_path / "two"
    for version in (1, 2):
        models.install_version(two_input_savedmodel, base, version)
    with serving(**_settings(base)) as (_, client):
        assert predict_version(client) == 2
        with Load(client, threads=1) as load:   # one thread: its answers are in serving order
            shutil.rmtree(base / "2")
            wait_for(lambda: rest_status(client).get(2, {}).get("state") == "END", what="v2 retired")
            served = len(load.versions)
            wait_for(lambda: len(load.versions) > served + 5, what="more requests after the swap")
        assert load.failures == []
        # v2 served until v1 was AVAILABLE, then v1 only: no gap, no going back.
        switch = load.versions.index(1)
        assert set(load.versions[:switch]) == {2} and set(load.versions[switch:]) == {1}
        assert rest_status(client)[1]["state"] == "AVAILABLE"
        with pytest.raises(grpc.RpcError) as info:
            predict_version(client, version=2)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "Servable not found for request: Specific(two, 2)" in info.value.details()

        # The last version goes too: nothing to fall back on, so a clear NOT_FOUND.
        shutil.rmtree(base / "1")
        wait_for(lambda: rest_status(client)[1]["state"] == "END", what="v1 retired")
        r = client.http.post(f"{client.rest}/v1/models/two:predict",
                             json={"inputs": {"x": X.tolist(), "tag": ["a", "bc"]}}, timeout=10)
        assert r.status_code == 404, r.text
        assert r.json() == {"error": "Servable not found for request: Latest(two)"}
        assert {s["state"] for s in rest_status(client).values()} == {"END"}


def test_corrupt_variables_previous_version_keeps_serving(tmp_path, two_input_savedmodel):
    base = tmp_path / "two"
    models.install_version(two_input_savedmodel, base, 1)
    with serving(**_settings(base)) as (_, client):
        with Load(client) as load:
            staged = _broken_copy(two_input_savedmodel, base / ".tmp-2", "variables")
            os.rename(staged, base / "2")
            failed = wait_for(lambda: (lambda s: s if s.get("state") == "END" else None)(
                rest_status(client).get(2, {})), what="v2 load to fail")
            # The serving version's own files going bad changes nothing: it is in memory.
            for f in (base / "1" / "variables").glob("variables.data-*"):
                f.write_bytes(b"\0" * f.stat().st_size)
            served = len(load.versions)
            wait_for(lambda: len(load.versions) > served + 5, what="more requests after the failure")
        assert load.failures == []
        assert set(load.versions) == {1}
        assert failed["status"]["error_code"] != "OK" and failed["status"]["error_message"], failed
        assert rest_status(client, "/versions/1")[1]["state"] == "AVAILABLE"
        assert load_failures(client) >= 1


def test_failed_load_is_retried_with_back_off_and_reported(tmp_path, two_input_savedmodel, caplog):
    caplog.set_level(logging.INFO, logger="serving.manager")
    base = tmp_path / "two"
    models.install_version(two_input_savedmodel, base, 1)
    _broken_copy(two_input_savedmodel, tmp_path / "broken", "graph").rename(base / "2")
    # The newest version is broken from the start: v1 stands in for it.
    with serving(**_settings(base)) as (_, client):
        assert predict_version(client) == 1
        wait_for(lambda: load_failures(client) >= 3, timeout=20, what="three load attempts")
        # When each attempt failed, from the manager's log records.
        times = [r.created for r in caplog.records if "version 2 failed to load" in r.getMessage()]
        assert len(times) >= 3, caplog.text
        first_gap, second_gap = times[1] - times[0], times[2] - times[1]
        # The manager's default back-off: 1 s, then 2 s (a poll of 0.1 s and the load add a little;
        # the upper bounds only say that the retry did come, on a busy machine too).
        assert 1.0 <= first_gap < 2.5, times
        assert 2.0 <= second_gap < 4.5 and second_gap > first_gap, times
        assert "attempt 3, retry in 4.00s" in caplog.text

        status = rest_status(client)
        assert status[1]["state"] == "AVAILABLE"
        assert status[2]["state"] == "END"
        assert status[2]["status"]["error_code"] != "OK"
        assert "not a valid SavedModel" in status[2]["status"]["error_message"]
        listed = client.http.get(f"{client.rest}/v1/models", timeout=10).json()["models"]
        assert any(s["version"] == "2" and s["status"]["error_message"] for s in listed[0]["model_version_status"])

        # Repaired in place: the next retry loads it and it takes over, its error cleared.
        shutil.copy(two_input_savedmodel / "saved_model.pb", base / "2" / "saved_model.pb")
        wait_for(lambda: rest_status(client).get(2, {}).get("state") == "AVAILABLE", timeout=20,
                 what="v2 loaded by a retry")
        assert rest_status(client)[2]["status"] == {"error_code": "OK", "error_message": ""}
        assert predict_version(client) == 2
        assert load_failures(client) == 3


def test_bad_labels_file_is_ignored_and_old_labels_stay(tmp_path, two_input_savedmodel, caplog):
    caplog.set_level(logging.INFO, logger="serving.manager")
    base = tmp_path / "two"
    for version in (1, 2):
        models.install_version(two_input_savedmodel, base, version)
    labels = base / "labels.json"
    _write_atomically(labels, json.dumps({"stable": 1, "canary": 2}))
    with serving(**_settings(base)) as (_, client):

        def labels_in_force() -> dict:
            listed = client.http.get(f"{client.rest}/v1/models", timeout=10).json()["models"]
            return listed[0]["labels"]

        wait_for(lambda: labels_in_force() == {"stable": 1, "canary": 2}, what="labels applied")

        def check_old_labels() -> None:
            assert labels_in_force() == {"stable": 1, "canary": 2}
            assert predict_version(client, label="stable") == 1
            assert predict_version(client, label="canary") == 2

        check_old_labels()
        _write_atomically(labels, '{"stable": 2, "canary":')
        wait_for(lambda: "labels.json: not valid JSON" in caplog.text, what="bad JSON logged")
        assert any(r.levelno == logging.ERROR and "ignoring" in r.getMessage() for r in caplog.records)
        check_old_labels()

        caplog.clear()
        _write_atomically(labels, json.dumps({"stable": 9, "canary": 2}))
        wait_for(lambda: "'stable' -> version 9 not applied" in caplog.text, what="missing version logged")
        assert "label stays on version 1" in caplog.text
        check_old_labels()

        caplog.clear()
        _write_atomically(labels, json.dumps({"stable": "two", "canary": 2}))
        wait_for(lambda: "must map to a version number" in caplog.text, what="bad label value logged")
        check_old_labels()

        # The file is still followed: a good change applies at once.
        _write_atomically(labels, json.dumps({"stable": 2}))
        wait_for(lambda: labels_in_force() == {"stable": 2}, what="good labels applied")
        assert predict_version(client, label="stable") == 2


def test_base_path_unreadable_for_a_while_keeps_serving(tmp_path, two_input_savedmodel, caplog):
    caplog.set_level(logging.WARNING, logger="serving.repository")
    base = tmp_path / "two"
    models.install_version(two_input_savedmodel, base, 1)
    with serving(**_settings(base)) as (_, client):
        with Load(client) as load:
            # A remount or a slow network volume: the whole directory is gone for several polls.
            base.rename(tmp_path / "away")
            wait_for(lambda: "cannot list model base path" in caplog.text, what="listing failure logged")
            time.sleep(0.5)
            (tmp_path / "away").rename(base)
            served = len(load.versions)
            wait_for(lambda: len(load.versions) > served + 5, what="more requests")
        assert load.failures == []
        assert set(load.versions) == {1}
        assert rest_status(client)[1]["state"] == "AVAILABLE"


# ---------------------------------------------------------------------- SIGTERM


def test_sigterm_under_load_answers_every_accepted_request_then_exits_0(tmp_path, two_input_savedmodel):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    # A 0.2 s batch timeout keeps several requests in flight at any moment.
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 64 } batch_timeout_micros { value: 200000 }\n"
                        "num_batch_threads { value: 1 } max_enqueued_batches { value: 100 }\n")
    server = Subprocess(["--port", "0", "--rest_api_port", str(free_port()), "--model_name", "two",
                         "--model_base_path", str(tmp_path / "two"), "--batching_parameters_file",
                         str(batching), "--drain_seconds", "30"], tmp_path / "serve.log")
    stop = threading.Event()
    outcomes: list[tuple[str, float, float, str]] = []   # (kind, start, end, outcome)
    lock = threading.Lock()

    def record(kind: str, start: float, outcome: str) -> None:
        with lock:
            outcomes.append((kind, start, time.monotonic(), outcome))

    def rest_loop() -> None:
        with requests.Session() as http:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    r = http.post(f"{server.client.rest}/v1/models/two:predict",
                                  json={"inputs": {"x": X.tolist(), "tag": ["a", "bc"]}}, timeout=60)
                    if r.status_code == 200:
                        np.testing.assert_allclose(r.json()["outputs"]["y"], EXPECTED, atol=1e-5)
                        record("rest", start, "OK")
                    elif r.status_code == 503 and "shutting down" in r.json()["error"]:
                        record("rest", start, "refused")
                        return
                    else:
                        record("rest", start, f"HTTP {r.status_code}: {r.text[:200]}")
                except Exception as exc:  # a dropped or wrong answer: asserted on below
                    record("rest", start, repr(exc))
                    return

    def grpc_loop() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                predict_version(server.client)
                record("grpc", start, "OK")
            except grpc.RpcError as exc:
                refused = exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (exc.details() or "")
                record("grpc", start, "refused" if refused else f"{exc.code()}: {exc.details()}")
                return
            except Exception as exc:
                record("grpc", start, repr(exc))
                return

    threads = [threading.Thread(target=fn, daemon=True) for fn in (rest_loop, grpc_loop) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: sum(o[3] == "OK" for o in outcomes) >= 12, what="load to build up")
        sigterm_at = time.monotonic()
        server.proc.terminate()
        # No new requests from here on; the ones already sent must all be answered.
        stop.set()
        for thread in threads:
            thread.join(60)
        code = server.proc.wait(60)
    finally:
        stop.set()
        exit_code = server.stop()
    bad = [o for o in outcomes if o[3] not in ("OK", "refused")]
    assert bad == [], (bad, server.log()[-3000:])
    in_flight = [o for o in outcomes if o[1] < sigterm_at < o[2] and o[3] == "OK"]
    assert len(in_flight) >= 2, ("no request was in flight at SIGTERM", outcomes[-10:])
    assert code == 0 and exit_code == 0, server.log()[-3000:]
    assert "draining" in server.log()
