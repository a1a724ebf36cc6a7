"""Why a server is not ready: a missing, empty or failing model says so in /readyz, V2 ready and the log.

A ``--model_base_path`` that does not exist is not an error (a volume may be
mounted later, as TF Serving waits for it): the server runs, not ready, logs one
WARNING when the path goes missing and one when that changes (not at every
poll), and ``/readyz`` names the model and the reason until a version loads.
"""

from __future__ import annotations

import logging
import time

import requests

from serving.runtime.server import GraftServer
from serving.runtime.settings import ServerConfig
from tests import models
from tests.ports import free_port

POLL_S = 0.1


def _wait(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _readyz(rest: str) -> tuple[int, dict]:
    answer = requests.get(f"{rest}/readyz", timeout=10)
    return answer.status_code, answer.json()


def test_a_missing_base_path_is_named_until_a_version_loads(tmp_path, two_input_savedmodel, caplog):
    caplog.set_level(logging.INFO, logger="serving.repository")
    base = tmp_path / "pets"
    server = GraftServer(ServerConfig(host="127.0.0.1", port=0, rest_api_port=free_port(), model_name="pets",
                                      model_base_path=str(base), file_system_poll_wait_seconds=POLL_S))
    server.start()
    rest = f"http://127.0.0.1:{server.rest_port}"
    try:
        missing = f"cannot list model base path {base}: it does not exist"
        assert _readyz(rest) == (503, {"status": "not ready", "models": {"pets": missing}})
        v2 = requests.get(f"{rest}/v2/health/ready", timeout=10)
        assert v2.status_code == 400 and v2.json() == {"error": f"not ready: model pets: {missing}"}
        time.sleep(10 * POLL_S)   # ten polls that still find it missing: still one line
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings] == [
            f"{missing} (nothing to serve from it until then; looking again at every poll)"]

        base.mkdir()
        empty = f"model base path {base} holds no version yet (a version is an integer directory holding saved_model.pb)"
        _wait(lambda: _readyz(rest)[1].get("models") == {"pets": empty}, "the empty directory named")
        time.sleep(10 * POLL_S)
        assert sum(empty in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1

        (base / "1").mkdir()
        (base / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
        _wait(lambda: "version 1 failed to load" in _readyz(rest)[1].get("models", {}).get("pets", ""),
              "the failed load named")

        models.install_version(two_input_savedmodel, base, 2)
        _wait(lambda: _readyz(rest)[0] == 200, "ready")
        assert requests.get(f"{rest}/v2/health/ready", timeout=10).status_code == 200
        assert f"model base path {base} now holds versions" in caplog.text
    finally:
        server.drain_and_stop()
