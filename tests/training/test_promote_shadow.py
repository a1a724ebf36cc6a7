"""The promotion gate's live half (--shadow-url) against a real graft-serve mirroring real traffic.

The models are test_promote's colour models, whose answers are known by
construction: "good" classifies every evaluation image right, "fair" sends
class c2 to c1. On traffic of four images per class, a "fair" canary beside a
"good" stable agrees on exactly 8 of 12 rows, and a "good" canary on 12 of 12.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.ports import free_port
from tests.serving.server import serving
from tests.training.test_promote import CLASSES, _repo, eval_dir, exports  # noqa: F401 (fixtures)
from training import cli, promote
from training.shadow import ShadowGate

PER_CLASS = 4


def _traffic(images: Path) -> list[dict]:
    bodies = []
    for name in CLASSES:
        for path in sorted((images / name).glob("*.png"))[:PER_CLASS]:
            bodies.append({"instances": [np.asarray(keras.utils.load_img(path), np.float32).tolist()]})
    return bodies


def _send(client, bodies: list[dict]) -> None:
    for body in bodies:
        r = client.http.post(f"{client.rest}/v1/models/m/labels/stable:predict", json=body, timeout=30)
        assert r.status_code == 200, r.text


def _shadow(client) -> dict:
    return client.http.get(f"{client.rest}/v1/models/m/shadow", timeout=10).json()


def _wait(client, test, what: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while not test(shown := _shadow(client)):
        assert time.monotonic() < end, f"{what}: {shown}"
        time.sleep(0.1)
    return shown


def _promote(capsys, root: Path, candidate: int, images: Path, *extra: str) -> tuple[int, dict]:
    code = cli.main(["promote", "--repo", str(root), "--model-name", "m", "--candidate", str(candidate),
                     "--eval-data", str(images), *extra])
    return code, json.loads(capsys.readouterr().out)


def test_the_gate_decides_on_live_figures(tmp_path, exports, eval_dir, capsys):  # noqa: F811
    root, model_dir = _repo(tmp_path, exports, "good", "good", "fair")
    assert promote.promote(root, "m", 1, eval_dir)["decision"] == "promoted"
    assert promote.promote(root, "m", 3, eval_dir, label="canary")["decision"] == "promoted"
    bodies = _traffic(eval_dir)
    with serving(model_name="m", model_base_path=str(model_dir), shadow_fraction=1.0,
                 file_system_poll_wait_seconds=0.2) as (_, client):
        url = client.rest
        _wait(client, lambda s: (s["stable"], s["canary"]) == (1, 3), "labels")
        _send(client, bodies)
        shown = _wait(client, lambda s: s["compared"] == len(bodies), "comparisons")
        assert (shown["rows"], shown["agreed_rows"]) == (12, 8)

        # The held-out half tolerates the loss (--min-delta -1): the live figure rejects.
        code, report = _promote(capsys, root, 3, eval_dir, "--min-delta", "-1", "--shadow-url", url,
                                "--min-agreement", "0.9", "--min-shadow-requests", "10")
        assert code == 1 and report["decision"] == "rejected"
        assert report["shadow"]["figures"]["agreement"] == pytest.approx(8 / 12)
        assert report["shadow"]["passed"] is False and "live agreement 0.6667" in report["reason"]
        assert json.loads((model_dir / "labels.json").read_text())["stable"] == 1

        # Too few compared requests is a rejection that says so.
        code, report = _promote(capsys, root, 3, eval_dir, "--min-delta", "-1", "--shadow-url", url,
                                "--min-agreement", "0.5", "--min-shadow-requests", "100")
        assert code == 1 and "too few compared requests: 12 < 100" in report["reason"]

        # A server that cannot be reached is an error, decided before any evaluation.
        code, report = _promote(capsys, root, 3, eval_dir, "--shadow-url", f"http://127.0.0.1:{free_port()}",
                                "--min-agreement", "0.5", "--min-shadow-requests", "1")
        assert code == 2 and report["decision"] == "error" and "cannot reach" in report["reason"]
        assert report["candidate"]["evaluation"] is None

        # A "good" canary: the gate waits (--shadow-wait) for the traffic that arrives meanwhile, and passes.
        assert promote.promote(root, "m", 2, eval_dir, label="canary")["decision"] == "promoted"
        _wait(client, lambda s: s["canary"] == 2, "canary label")
        sender = threading.Timer(1.0, _send, (client, bodies))
        sender.start()
        try:
            code, report = _promote(capsys, root, 2, eval_dir, "--shadow-url", url, "--min-agreement", "0.95",
                                    "--min-shadow-requests", "12", "--max-js", "0.01", "--shadow-wait", "60")
        finally:
            sender.join()
        assert code == 0 and report["decision"] == "promoted", report["reason"]
        figures = report["shadow"]["figures"]
        assert (figures["stable"], figures["canary"], figures["compared"], figures["agreement"]) == (1, 2, 12, 1.0)
        assert figures["js_divergence"] == 0.0 and report["shadow"]["passed"] is True
        assert json.loads((model_dir / "labels.json").read_text())["stable"] == 2
        # stable and canary are one version now: nothing is mirrored.
        shown = _wait(client, lambda s: s["stable"] == 2, "stable label")
        assert shown["since"] is None and shown["mirrored"] == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-agreement", "0.9"], "--min-agreement needs --shadow-url"),
    (["--shadow-url", "http://h:8501", "--min-agreement", "0.9"], "--shadow-url needs --min-shadow-requests"),
    (["--shadow-url", "h:8501", "--min-agreement", "0.9", "--min-shadow-requests", "5"], "http(s) URL"),
    (["--shadow-url", "http://h:8501", "--min-agreement", "1.5", "--min-shadow-requests", "5"], "0..1"),
    (["--shadow-url", "http://h:8501", "--min-agreement", "0.9", "--min-shadow-requests", "0"], "at least 1"),
])
def test_flags_that_do_not_go_together_are_an_error(tmp_path, capsys, flags, message):
    code = cli.main(["promote", "--repo", str(tmp_path), "--model-name", "m", "--candidate", "2",
                     "--eval-data", str(tmp_path), *flags])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and message in report["reason"]


def test_an_export_directory_cannot_be_judged_live(tmp_path, exports, eval_dir):  # noqa: F811
    root, _ = _repo(tmp_path, exports, "good")
    gate = promote.Gate(shadow=ShadowGate(f"http://127.0.0.1:{free_port()}", 0.9, 5))
    report = promote.promote(root, "m", exports["fair"], eval_dir, gate=gate)
    assert report["exit_code"] == 2 and "version number the server labels canary" in report["reason"]
