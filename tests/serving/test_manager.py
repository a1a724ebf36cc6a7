"""ModelManager on real SavedModels: loading, swaps, drains, failures, labels, warmup."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from tensorflow_serving.apis import inference_pb2, prediction_log_pb2

from serving.config import ModelConfig, VersionPolicy, parse_model_config
from serving.errors import InvalidArgument, NotFound
from serving import warmup
from serving.manager import ModelManager, VersionState
from serving.servable import Servable
from serving.service import InferenceService
from tests import models

X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=np.float32)
TAGS = np.array([b"a", b"bc"], dtype=object)


def run_two(servable):
    """Run the two-input model and check its answer, so a wrong servable cannot pass."""
    out = servable.run("serving_default", {"x": X, "tag": TAGS})
    np.testing.assert_allclose(out["y"], models.two_input_expected(X), atol=1e-5)
    return out


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Recorder:
    """A listener recording every event in order, thread-safely."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def _add(self, event):
        with self.lock:
            self.events.append(event)

    def on_state(self, name, version, state):
        self._add(("state", name, version, str(state)))

    def on_load(self, name, version, seconds, error):
        self._add(("load", name, version, error))

    def on_unload(self, name, version):
        self._add(("unload", name, version))

    def index(self, event):
        with self.lock:
            return self.events.index(event)

    def has(self, event):
        with self.lock:
            return event in self.events


@pytest.fixture
def make_manager():
    made = []

    def make(configs, **kwargs):
        kwargs.setdefault("poll_seconds", 0)
        kwargs.setdefault("settle_seconds", 0)
        kwargs.setdefault("retry_backoff", (0.05, 0.2))
        manager = ModelManager(configs, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop(timeout=10)


def two_input_repo(root, two_input_savedmodel, versions=(1,)):
    base = root / "two"
    for v in versions:
        models.install_version(two_input_savedmodel, base, v)
    return base


def state_of(manager, name, version):
    return {s.version: s for s in manager.status(name)}[version].state


def test_load_acquire_and_errors(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel)
    manager = make_manager([ModelConfig("two", str(base))])
    assert not manager.ready()
    manager.start()
    manager.wait_until_available("two", timeout=20)
    assert manager.ready()
    assert manager.model_names() == ["two"]
    assert manager.available_versions("two") == [1]
    [status] = manager.status("two")
    assert (status.version, status.state, status.error_code, status.error_message) == (1, "AVAILABLE", "OK", "")
    with manager.acquire("two") as servable:
        assert isinstance(servable, Servable) and servable.version == 1
        run_two(servable)
    with manager.acquire("two", version=1) as servable:
        assert servable.version == 1
    with pytest.raises(NotFound, match=r"Servable not found for request: Latest\(nope\)"):
        with manager.acquire("nope"):
            pass
    with pytest.raises(NotFound, match=r"Specific\(two, 9\)"):
        with manager.acquire("two", version=9):
            pass
    with pytest.raises(InvalidArgument, match="label: canary"):
        with manager.acquire("two", label="canary"):
            pass
    with pytest.raises(InvalidArgument, match="not both"):
        with manager.acquire("two", version=1, label="stable"):
            pass
    with pytest.raises(NotFound):
        manager.status("nope")
    with pytest.raises(NotFound):
        manager.status("two", version=5)
    with pytest.raises(TimeoutError):
        manager.wait_until_available("two", version=5, timeout=0.05)


def test_swap_new_before_old_and_drain(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel)
    recorder = Recorder()
    manager = make_manager([ModelConfig("two", str(base))], listener=recorder)
    manager.start()
    manager.wait_until_available("two", 1)

    holding, release, result = threading.Event(), threading.Event(), {}

    def in_flight():
        with manager.acquire("two") as servable:
            holding.set()
            release.wait(20)
            result["version"] = servable.version
            result["out"] = run_two(servable)  # v1 must still work while it drains
            recorder._add(("request-done", "two", servable.version))

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert holding.wait(10)

    models.install_version(two_input_savedmodel, base, 2)
    manager.poll()                                 # first sighting: not yet complete
    assert manager.available_versions("two") == [1]
    manager.poll()
    manager.wait_until_available("two", 2)
    wait_for(lambda: state_of(manager, "two", 1) == "UNLOADING", what="v1 UNLOADING")
    # New requests go to v2; v1 is no longer offered but is not torn down under the request.
    with manager.acquire("two") as servable:
        assert servable.version == 2
    with pytest.raises(NotFound):
        with manager.acquire("two", version=1):
            pass
    time.sleep(0.2)
    assert state_of(manager, "two", 1) == "UNLOADING"
    assert not recorder.has(("unload", "two", 1))

    release.set()
    thread.join(10)
    assert result["version"] == 1
    wait_for(lambda: state_of(manager, "two", 1) == "END", what="v1 END")
    assert recorder.index(("state", "two", 2, "AVAILABLE")) < recorder.index(("state", "two", 1, "UNLOADING"))
    assert recorder.index(("request-done", "two", 1)) < recorder.index(("unload", "two", 1))
    assert recorder.index(("unload", "two", 1)) < recorder.index(("state", "two", 1, "END"))
    v1_states = [e[3] for e in recorder.events if e[0] == "state" and e[2] == 1]
    assert v1_states == ["START", "LOADING", "AVAILABLE", "UNLOADING", "END"]
    assert manager.status("two", version=1)[0].error_code == "OK"


def corrupt_pb(version_dir):
    (version_dir / "saved_model.pb").write_bytes(b"\x08\x96garbage, not a SavedModel" * 20)


def corrupt_variables(version_dir):
    for f in (version_dir / "variables").iterdir():
        f.write_bytes(b"corrupt" * 10)


@pytest.mark.parametrize("corrupt", [corrupt_pb, corrupt_variables])
def test_corrupt_version_keeps_old_serving_then_retries(tmp_path, two_input_savedmodel, make_manager, corrupt):
    base = two_input_repo(tmp_path, two_input_savedmodel)
    attempts = []

    def loader(name, version, path):
        attempts.append((version, time.monotonic()))
        return Servable.load(name, version, path)

    manager = make_manager([ModelConfig("two", str(base))], servable_loader=loader,
                           retry_backoff=(0.3, 0.6))
    manager.start()
    manager.wait_until_available("two", 1)

    staging = tmp_path / "staging"
    shutil.copytree(two_input_savedmodel, staging)
    corrupt(staging)
    staging.rename(base / "2")
    manager.poll()
    manager.poll()
    wait_for(lambda: state_of(manager, "two", 2) == "END", what="v2 failed")
    failed = manager.status("two", version=2)[0]
    assert failed.error_code != "OK" and failed.error_message
    assert manager.available_versions("two") == [1]
    with manager.acquire("two") as servable:
        assert servable.version == 1
        run_two(servable)

    # No retry before the back-off has passed.
    manager.poll()
    time.sleep(0.05)
    assert [v for v, _ in attempts] == [1, 2]
    wait_for(lambda: (manager.poll() or len(attempts)) >= 3, what="first retry")
    assert attempts[2][1] - attempts[1][1] >= 0.3
    wait_for(lambda: state_of(manager, "two", 2) == "END", what="v2 failed again")
    assert manager.available_versions("two") == [1]

    # Fix the files in place; the next retry loads it and v1 is retired.
    shutil.rmtree(base / "2" / "variables")
    shutil.copytree(two_input_savedmodel / "variables", base / "2" / "variables")
    shutil.copy(two_input_savedmodel / "saved_model.pb", base / "2" / "saved_model.pb")
    wait_for(lambda: (manager.poll() or 2 in manager.available_versions("two")), what="v2 loaded")
    assert manager.status("two", version=2)[0].error_message == ""
    wait_for(lambda: state_of(manager, "two", 1) == "END", what="v1 retired")
    with manager.acquire("two") as servable:
        assert servable.version == 2
        run_two(servable)


def test_labels_json_moves_and_bad_file_ignored(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel, versions=(1, 2))
    (base / "labels.json").write_text('{"stable": 1, "canary": 2}')
    manager = make_manager([ModelConfig("two", str(base), labels={"old": 1})])
    manager.start()
    # Policy latest 1 selects only v2, but the labelled v1 must be loaded too.
    wait_for(lambda: manager.available_versions("two") == [1, 2], what="both loaded")
    assert manager.labels("two") == {"old": 1, "stable": 1, "canary": 2}
    with manager.acquire("two", label="stable") as servable:
        assert servable.version == 1
    with manager.acquire("two", label="canary") as servable:
        assert servable.version == 2
    assert manager.status("two", label="canary")[0].version == 2

    (base / "labels.json").write_text('{"stable": 2, "old": 2}')   # labels.json wins over config
    manager.poll()
    assert manager.labels("two") == {"old": 2, "stable": 2}
    with manager.acquire("two", label="stable") as servable:
        assert servable.version == 2
    wait_for(lambda: manager.available_versions("two") == [2], what="unlabelled v1 retired")

    (base / "labels.json").write_text('{"stable": 1,')              # bad JSON: keep labels
    manager.poll()
    assert manager.labels("two") == {"old": 2, "stable": 2}
    # No such version: stable stays on 2. "old" is no longer overridden, so the config's
    # old -> 1 applies again once v1 is loaded back for it.
    (base / "labels.json").write_text('{"stable": 7}')
    manager.poll()
    assert manager.labels("two")["stable"] == 2
    wait_for(lambda: manager.labels("two") == {"old": 1, "stable": 2}, what="config label back")
    with pytest.raises(InvalidArgument):
        with manager.acquire("two", label="canary"):
            pass


def test_label_waits_for_version_to_become_available(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel, versions=(1, 2))
    (base / "labels.json").write_text('{"stable": 2}')
    manager = make_manager([ModelConfig("two", str(base), policy=VersionPolicy("specific", versions=(2,)))])
    manager.start()
    manager.wait_until_available("two", 2)
    assert manager.labels("two") == {"stable": 2}
    # Point the label at v1, outside the policy: it loads, then the label moves.
    (base / "labels.json").write_text('{"stable": 1}')
    manager.poll()
    wait_for(lambda: manager.labels("two") == {"stable": 1}, what="label moved to v1")
    assert manager.available_versions("two") == [1, 2]
    with manager.acquire("two", label="stable") as servable:
        assert servable.version == 1


def test_specific_policy_two_models(tmp_path, two_input_savedmodel, tiny_cnn_savedmodel, make_manager):
    for v in (1, 2, 3):
        models.install_version(two_input_savedmodel, tmp_path / "two", v)
        models.install_version(tiny_cnn_savedmodel, tmp_path / "cnn", v)
    configs = parse_model_config(f"""
        model_config_list {{
          config {{ name: "two" base_path: "{tmp_path / 'two'}"
                   model_version_policy {{ specific {{ versions: 1 versions: 3 }} }} }}
          config {{ name: "cnn" base_path: "{tmp_path / 'cnn'}"
                   model_version_policy {{ specific {{ versions: 2 }} }} }}
        }}""")
    manager = make_manager(configs)
    manager.start()
    wait_for(manager.ready, what="ready")
    wait_for(lambda: manager.available_versions("two") == [1, 3], what="two 1 and 3")
    assert manager.available_versions("cnn") == [2]
    assert sorted(s.version for s in manager.status("two")) == [1, 3]
    with manager.acquire("two") as servable:
        assert servable.version == 3
    with manager.acquire("cnn") as servable:
        out = servable.run("serving_default", {"images": np.zeros((1, 32, 32, 3), np.float32)})
        assert out["output_0"].shape == (1, 3)


def test_reload_config_adds_and_removes(tmp_path, two_input_savedmodel, tiny_cnn_savedmodel, make_manager):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    models.install_version(tiny_cnn_savedmodel, tmp_path / "cnn", 1)
    recorder = Recorder()
    manager = make_manager([ModelConfig("two", str(tmp_path / "two"))], listener=recorder)
    manager.start()
    manager.wait_until_available("two")
    manager.reload_config([ModelConfig("cnn", str(tmp_path / "cnn"))])
    manager.wait_until_available("cnn")
    assert manager.model_names() == ["cnn"]
    with pytest.raises(NotFound):
        with manager.acquire("two"):
            pass
    wait_for(lambda: recorder.has(("state", "two", 1, "END")), what="two unloaded")
    assert recorder.has(("unload", "two", 1))
    assert manager.ready()
    # And back again.
    manager.reload_config([ModelConfig("cnn", str(tmp_path / "cnn")), ModelConfig("two", str(tmp_path / "two"))])
    manager.wait_until_available("two")
    assert manager.model_names() == ["cnn", "two"]
    with pytest.raises(ValueError):
        manager.reload_config([ModelConfig("a", "/a"), ModelConfig("a", "/b")])


def test_deleted_version_dir_unloaded_and_older_takes_over(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel, versions=(1, 2))
    manager = make_manager([ModelConfig("two", str(base))])
    manager.start()
    manager.wait_until_available("two", 2)
    assert manager.available_versions("two") == [2]
    shutil.rmtree(base / "2")
    manager.poll()
    manager.wait_until_available("two", 1)
    wait_for(lambda: state_of(manager, "two", 2) == "END", what="v2 unloaded")
    assert manager.available_versions("two") == [1]
    with manager.acquire("two") as servable:
        assert servable.version == 1
        run_two(servable)


class CountingServable(Servable):
    """A real Servable that logs each run into a shared list (to order it against states)."""

    events: list = []

    def run(self, signature_name, inputs):
        result = super().run(signature_name, inputs)
        self.events.append(("run", self.version, signature_name))
        return result


def _warmed_manager(make_manager, configs, **kwargs):
    """A manager whose versions are warmed through an InferenceService, as graft-serve wires it."""
    services = []
    manager = make_manager(configs, warmup=lambda servable: warmup.replay(services[0], servable), **kwargs)
    services.append(InferenceService(manager))
    return manager


def test_warmup_replayed_before_available(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel)
    rows = [[1.0, 2.0, 3.0]]
    multi = inference_pb2.MultiInferenceRequest()
    multi.input.example_list_with_context.examples.add().CopyFrom(models.make_example(rows[0]))
    multi.input.example_list_with_context.context.CopyFrom(models.make_example([0.0, 0.0, 0.0]))
    for sig, method in (("classify", models.CLASSIFY_METHOD), ("regress", models.REGRESS_METHOD)):
        task = multi.tasks.add()
        task.model_spec.signature_name = sig
        task.method_name = method
    records = [
        models.predict_log({"x": X, "tag": TAGS}),
        models.predict_log({"x": X[:1]}, signature_name="checked"),
        models.classify_log(rows),
        models.regress_log(rows),
        prediction_log_pb2.PredictionLog(
            multi_inference_log=prediction_log_pb2.MultiInferenceLog(request=multi)),
    ]
    models.write_warmup(base / "1", records)
    events = CountingServable.events = []

    class Listener:
        def on_state(self, name, version, state):
            events.append(("state", version, str(state)))

    manager = _warmed_manager(make_manager, [ModelConfig("two", str(base))],
                              servable_loader=CountingServable.load, listener=Listener())
    manager.start()
    manager.wait_until_available("two")
    wait_for(lambda: ("state", 1, "AVAILABLE") in events, what="AVAILABLE event")
    available_at = events.index(("state", 1, "AVAILABLE"))
    runs = [e for e in events[:available_at] if e[0] == "run"]
    assert runs == [("run", 1, "serving_default"), ("run", 1, "checked"), ("run", 1, "classify"),
                    ("run", 1, "regress"), ("run", 1, "classify"), ("run", 1, "regress")]


def test_failing_warmup_fails_load(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel)
    models.write_warmup(base / "1", [models.predict_log({"x": -X[:1]}, signature_name="checked")])
    manager = _warmed_manager(make_manager, [ModelConfig("two", str(base))])
    manager.start()
    wait_for(lambda: manager.status("two")[0].state == "END", what="load failure")
    status = manager.status("two")[0]
    assert status.error_code == "INVALID_ARGUMENT" and "x must be >= 0" in status.error_message
    assert "warmup" in status.error_message
    assert not manager.ready()
    # Without a warmup runner the file is not read at all.
    other = make_manager([ModelConfig("two", str(base))])
    other.start()
    other.wait_until_available("two")


def test_warmup_records_get_a_requests_validation(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel)
    # An input the signature does not have: a request would be refused, so the load is too.
    models.write_warmup(base / "1", [models.predict_log({"x": X, "tag": TAGS, "surplus": X})])
    manager = _warmed_manager(make_manager, [ModelConfig("two", str(base))])
    manager.start()
    wait_for(lambda: manager.status("two")[0].state == "END", what="load failure")
    status = manager.status("two")[0]
    assert status.error_code == "INVALID_ARGUMENT", status
    assert "warmup record 1" in status.error_message and "surplus" in status.error_message


def test_listener_errors_do_not_break_manager(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel)

    class Broken:
        def on_state(self, *args):
            raise RuntimeError("listener bug")

        on_load = on_unload = on_state

    recorder = Recorder()
    manager = make_manager([ModelConfig("two", str(base))], listener=Broken())
    manager.add_listener(recorder)
    manager.start()
    manager.wait_until_available("two")
    models.install_version(two_input_savedmodel, base, 2)
    manager.poll()
    manager.poll()
    manager.wait_until_available("two", 2)
    wait_for(lambda: recorder.has(("state", "two", 1, "END")), what="v1 END despite broken listener")


def test_stop_unloads_everything_and_joins(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel)
    recorder = Recorder()
    manager = make_manager([ModelConfig("two", str(base))], listener=recorder, poll_seconds=0.05)
    manager.start()
    manager.wait_until_available("two")
    # The background poller picks up a new version by itself.
    models.install_version(two_input_savedmodel, base, 2)
    manager.wait_until_available("two", 2, timeout=20)
    threads = [t for t in threading.enumerate() if t.name.startswith("graft-model-")]
    assert len(threads) == 2
    manager.stop()
    assert not any(t.is_alive() for t in threads)
    assert all(s.state == VersionState.END for s in manager.status("two"))
    assert recorder.has(("unload", "two", 2))


def test_broken_newest_version_at_start_falls_back_to_older(tmp_path, two_input_savedmodel, make_manager):
    base = two_input_repo(tmp_path, two_input_savedmodel, versions=(1, 2))
    corrupt_pb(base / "2")
    manager = make_manager([ModelConfig("two", str(base))], retry_backoff=(30.0, 60.0))
    manager.start()
    manager.wait_until_available("two", 1)
    assert manager.ready()
    statuses = {s.version: s for s in manager.status("two")}
    assert statuses[2].state == "END" and "not a valid SavedModel" in statuses[2].error_message
    with manager.acquire("two") as servable:
        assert servable.version == 1
        run_two(servable)
