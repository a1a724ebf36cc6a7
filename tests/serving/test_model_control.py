"""A client's load and unload (V2's model repository extension) through the service and the manager.

Real SavedModels, no server: the adapters' tests (test_v2_rest, test_v2_grpc) call the
same methods through tritonclient. Here the lifecycle itself is checked: an unload
drains the requests in flight before the version goes, new requests are refused at
once, a load picks up what is on disk now, and both are refused when the server
forbids model control.
"""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from serving.codecs import v2
from serving.config import ModelConfig
from serving.errors import FailedPrecondition, NotFound, PermissionDenied
from serving.manager import ModelManager
from serving.servable import Servable
from serving.service import InferenceService, PredictCall
from tests import models

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
TAGS = np.array([b"a"], dtype=object)


class GatedServable(Servable):
    """The two-input model, whose runs wait for ``gate`` once ``hold`` is set."""

    gate = threading.Event()
    hold = threading.Event()
    running = threading.Event()

    def run(self, signature_name, inputs):
        if self.hold.is_set():
            self.running.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().run(signature_name, inputs)


@pytest.fixture
def control(tmp_path, two_input_savedmodel):
    """A started manager and service over ``two`` (version 1), with model control allowed."""
    made = []

    def make(allow: bool = True, versions=(1,)):
        base = tmp_path / "two"
        for version in versions:
            models.install_version(two_input_savedmodel, base, version)
        manager = ModelManager([ModelConfig("two", str(base))], poll_seconds=0, settle_seconds=0,
                               retry_backoff=(0.05, 0.2), servable_loader=GatedServable.load)
        service = InferenceService(manager, allow_reload_requests=allow)
        manager.start()
        manager.wait_until_available("two")
        made.append(manager)
        return manager, service, base

    GatedServable.gate.clear()
    GatedServable.hold.clear()
    GatedServable.running.clear()
    yield make
    GatedServable.gate.set()
    for manager in made:
        manager.stop(timeout=10)


def _predict(service) -> dict:
    return service.predict(PredictCall("two", inputs={"x": X, "tag": TAGS})).outputs


def test_unload_drains_requests_in_flight_first(control):
    manager, service, _ = control()
    GatedServable.hold.set()
    answer = {}
    in_flight = threading.Thread(target=lambda: answer.update(out=_predict(service)))
    in_flight.start()
    assert GatedServable.running.wait(30)
    unloading = threading.Thread(target=service.unload_model, args=("two",))
    unloading.start()
    deadline = time.monotonic() + 10
    while manager.status("two")[0].state != "UNLOADING" and time.monotonic() < deadline:
        time.sleep(0.01)
    # The version no longer takes requests, but the one in flight still holds it.
    assert [(s.version, s.state) for s in manager.status("two")] == [(1, "UNLOADING")]
    with pytest.raises(NotFound):
        _predict(service)
    time.sleep(0.2)
    assert unloading.is_alive() and "out" not in answer
    GatedServable.gate.set()
    in_flight.join(30)
    unloading.join(30)
    np.testing.assert_allclose(answer["out"]["y"], models.two_input_expected(X), atol=1e-5)
    assert not unloading.is_alive()
    assert [(s.version, s.state) for s in manager.status("two")] == [(1, "END")]
    assert manager.is_unloaded("two") and manager.ready()  # unloaded by a client: not a readiness failure


def test_load_serves_again_with_fresh_statistics(control):
    manager, service, _ = control()
    _predict(service)
    assert service.statistics("two")[0].success.count == 1
    service.unload_model("two")
    assert service.statistics("two") == []
    manager.poll()  # a poll does not bring an unloaded model back
    assert manager.status("two")[0].state == "END"
    service.load_model("two")
    assert manager.status("two")[0].state == "AVAILABLE" and not manager.is_unloaded("two")
    (stats,) = service.statistics("two")
    assert (stats.version, stats.success.count, stats.execution_count) == (1, 0, 0)
    np.testing.assert_allclose(_predict(service)["y"], models.two_input_expected(X), atol=1e-5)


def test_load_picks_up_a_new_version_at_once(control, two_input_savedmodel):
    manager, service, base = control()
    models.install_version(two_input_savedmodel, base, 2)
    # Polling is off (poll_seconds=0): only the load's own rescan can find version 2.
    service.load_model("two")
    assert [(s.version, s.state) for s in manager.status("two")][0] == (2, "AVAILABLE")


def test_load_of_a_model_that_cannot_load_names_the_error(control):
    manager, service, base = control()
    service.unload_model("two")
    (base / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    with pytest.raises(FailedPrecondition) as info:
        service.load_model("two")
    assert "version 1" in str(info.value) and "two" in str(info.value)
    # Nothing on disk at all is said so too.
    shutil.rmtree(base / "1")
    with pytest.raises(FailedPrecondition, match="holds no version"):
        service.load_model("two")


def test_only_configured_models_and_only_when_allowed(control):
    manager, service, _ = control(allow=False)
    for call in (service.load_model, service.unload_model):
        with pytest.raises(PermissionDenied, match="--enable_reload_config_rpc=false"):
            call("two")
    assert manager.status("two")[0].state == "AVAILABLE"
    allowed = InferenceService(manager)
    for call in (allowed.load_model, allowed.unload_model):
        with pytest.raises(NotFound, match="not in the server's model config"):
            call("nope")


def test_repository_index_states_and_reasons(control):
    manager, service, base = control()
    assert v2.repository_index(service) == [{"name": "two", "version": "1", "state": "READY", "reason": ""}]
    service.unload_model("two")
    assert v2.repository_index(service) == [{"name": "two", "version": "1", "state": "UNAVAILABLE",
                                             "reason": "unloaded"}]
    assert v2.repository_index(service, ready=True) == []
