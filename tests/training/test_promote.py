"""Tests for training.promote: the gate, publishing, labels, history, rollback, locking, crashes.

The models are tiny real exports (training.export) whose quality on the
evaluation images is known by construction: each image's class shows as its
brightest colour channel, and a model is a colour-to-class matrix after global
average pooling. "good" maps each channel to its class (100 %), "fair" sends
class 2 to class 1 (2/3), "chance" swaps classes 1 and 2 (1/3, equal to chance).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.training.conftest import make_image_folder
from graft import contract
from training import cli, export, promote, repo

SIZE = 32
CLASSES = ["c0", "c1", "c2"]
MATRICES = {
    "good": np.eye(3),
    "fair": np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=float).T,
    "chance": np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=float),
}
ROOT = Path(__file__).resolve().parents[2]


def _colour_model(matrix: np.ndarray, size: int = SIZE) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3, activation="softmax")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    # Scaled up so that the softmax is confident but still varies with the input.
    dense.set_weights([np.asarray(matrix, np.float32) * 10.0, np.zeros(3, np.float32)])
    return model


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    """Held-out images: 8 per class, 32x32 PNG, class = brightest channel."""
    root = tmp_path_factory.mktemp("eval") / "images"
    make_image_folder(root, {name: 8 for name in CLASSES}, size=(SIZE, SIZE), seed=3)
    return root


@pytest.fixture(scope="module")
def exports(tmp_path_factory, eval_dir) -> dict[str, Path]:
    """Export directories (outside any tested repository) for each tiny model."""
    scratch = tmp_path_factory.mktemp("exports")
    paths = {}
    pixels = np.stack([np.asarray(keras.utils.load_img(sorted((eval_dir / c).glob("*.png"))[0])) for c in CLASSES])
    for name, matrix in MATRICES.items():
        model = _colour_model(matrix)
        scores = model(pixels.astype(np.float32)).numpy()
        assert np.ptp(scores, axis=0).max() > 1e-2, "the tiny model's output does not vary with input"
        paths[name] = Path(export.export_version(model, CLASSES, scratch, name, image_size=SIZE,
                                                 lineage={"base": "colour", "model": name}))
    paths["wide"] = Path(export.export_version(_colour_model(np.eye(3), 40), CLASSES, scratch, "wide",
                                               image_size=40, lineage={"base": "colour"}))
    paths["renamed"] = Path(export.export_version(_colour_model(np.eye(3)), ["x0", "x1", "x2"], scratch,
                                                  "renamed", image_size=SIZE, lineage={"base": "colour"}))
    return paths


def _repo(tmp_path: Path, exports: dict[str, Path], *versions: str) -> tuple[Path, Path]:
    """A repository with model "m" holding the named exports as versions 1, 2, ..."""
    root = tmp_path / "repo"
    for number, name in enumerate(versions, start=1):
        shutil.copytree(exports[name], root / "m" / str(number))
    (root / "m").mkdir(parents=True, exist_ok=True)
    return root, root / "m"


def _labels(model_dir: Path) -> dict:
    return json.loads((model_dir / "labels.json").read_text())


def _run_cli(argv: list[str], capsys) -> tuple[int, dict]:
    code = cli.main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out)


def _promote_argv(root: Path, candidate, eval_dir: Path, *extra: str) -> list[str]:
    return ["promote", "--repo", str(root), "--model-name", "m", "--candidate", str(candidate),
            "--eval-data", str(eval_dir), *extra]


def _assert_consistent(model_dir: Path) -> None:
    """labels.json valid and pointing at complete versions; every visible version complete."""
    versions = repo.list_versions(model_dir)
    for version in versions:
        path = model_dir / str(version)
        assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir(), path
        assert (path / "assets" / "labels.txt").is_file(), path
    labels = contract.read_labels(model_dir) or {}
    for name, version in labels.items():
        assert version in versions, (name, version, versions)


# -- the gate ------------------------------------------------------------------------

def test_first_promotion_passes_the_sanity_check_and_writes_everything(tmp_path, exports, eval_dir, capsys):
    root, model_dir = _repo(tmp_path, exports, "good")
    report_file = tmp_path / "out" / "report.json"
    code, printed = _run_cli(_promote_argv(root, 1, eval_dir, "--report", str(report_file)), capsys)
    assert code == 0
    assert json.loads(report_file.read_text()) == printed
    assert printed["decision"] == "promoted" and printed["exit_code"] == 0
    assert printed["current"]["version"] is None and printed["delta"] is None
    assert printed["candidate"]["value"] == 1.0 and printed["chance"] == pytest.approx(1 / 3)
    assert "sanity check passed" in printed["reason"]
    assert printed["eval_data"]["images"] == 24
    assert _labels(model_dir) == {"stable": 1}
    history = repo.read_history(model_dir)
    assert [(e["action"], e["label"], e["from"], e["to"], e["stack"]) for e in history] == [
        ("promote", "stable", None, 1, [1])]


def test_first_promotion_at_chance_is_rejected(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "chance")
    report = promote.promote(root, "m", 1, eval_dir)
    assert report["decision"] == "rejected" and report["exit_code"] == 1
    assert report["candidate"]["value"] == pytest.approx(1 / 3)
    assert "does not beat chance" in report["reason"]
    assert not (model_dir / "labels.json").exists()
    assert repo.read_history(model_dir) == []


def test_better_export_dir_is_published_then_labelled(tmp_path, exports, eval_dir, capsys):
    root, model_dir = _repo(tmp_path, exports, "fair")
    assert promote.promote(root, "m", "1", eval_dir)["decision"] == "promoted"
    code, report = _run_cli(_promote_argv(root, exports["good"], eval_dir), capsys)
    assert code == 0 and report["decision"] == "promoted"
    assert report["candidate"]["published"] is True and report["candidate"]["version"] == 2
    assert report["current"]["value"] == pytest.approx(2 / 3)
    assert report["candidate"]["value"] == 1.0
    assert report["delta"] == pytest.approx(1 / 3)
    assert repo.list_versions(model_dir) == [1, 2]
    assert _labels(model_dir) == {"stable": 2}
    # The published copy is the export, byte for byte.
    assert (model_dir / "2" / "saved_model.pb").read_bytes() == (exports["good"] / "saved_model.pb").read_bytes()
    assert not [p for p in model_dir.iterdir() if p.name.startswith(contract.TEMP_PREFIX)]
    history = repo.read_history(model_dir)
    assert history[-1]["stack"] == [1, 2] and history[-1]["source"] == str(exports["good"])


def test_worse_candidate_is_rejected_and_not_published(tmp_path, exports, eval_dir, capsys):
    root, model_dir = _repo(tmp_path, exports, "good")
    promote.promote(root, "m", 1, eval_dir)
    code, report = _run_cli(_promote_argv(root, exports["fair"], eval_dir, "--metric", "balanced_accuracy"),
                            capsys)
    assert code == 1 and report["decision"] == "rejected"
    assert report["metric"] == "balanced_accuracy"
    assert report["delta"] == pytest.approx(-1 / 3)
    assert "below the required" in report["reason"]
    assert repo.list_versions(model_dir) == [1]
    assert _labels(model_dir) == {"stable": 1}


def test_min_delta_decides_between_equal_models(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "good", "good")
    promote.promote(root, "m", 1, eval_dir)
    strict = promote.promote(root, "m", 2, eval_dir, gate=promote.Gate(min_delta=0.01))
    assert strict["decision"] == "rejected" and strict["delta"] == 0.0
    assert _labels(model_dir) == {"stable": 1}
    equal = promote.promote(root, "m", 2, eval_dir, gate=promote.Gate(min_delta=0.0, metric="macro_f1"))
    assert equal["decision"] == "promoted" and _labels(model_dir) == {"stable": 2}
    again = promote.promote(root, "m", 2, eval_dir)
    assert again["decision"] == "promoted" and "already under label" in again["reason"]
    assert len(repo.read_history(model_dir)) == 2


def test_signature_change_is_refused_unless_allowed(tmp_path, exports, eval_dir, capsys):
    root, model_dir = _repo(tmp_path, exports, "fair", "wide", "renamed")
    promote.promote(root, "m", 1, eval_dir)
    code, report = _run_cli(_promote_argv(root, 2, eval_dir), capsys)
    assert code == 1 and report["signature_check"]["compatible"] is False
    assert any("'images' shape [?,40,40,3] instead of [?,32,32,3]" in d
               for d in report["signature_check"]["differences"])
    assert "--allow-signature-change" in report["reason"]
    # Still scored, so the report shows both metrics.
    assert report["candidate"]["value"] == 1.0 and report["current"]["value"] == pytest.approx(2 / 3)
    assert _labels(model_dir) == {"stable": 1}

    renamed = promote.promote(root, "m", 3, eval_dir)
    assert renamed["decision"] == "rejected"
    assert any("class list" in d for d in renamed["signature_check"]["differences"])

    code, report = _run_cli(_promote_argv(root, 2, eval_dir, "--allow-signature-change"), capsys)
    assert code == 0 and _labels(model_dir) == {"stable": 2}


@pytest.mark.parametrize("problem", ["missing version", "no eval data", "single class", "dangling label",
                                     "broken labels", "bad export dir"])
def test_errors_exit_2_with_a_report_naming_the_problem(tmp_path, exports, eval_dir, capsys, problem):
    root, model_dir = _repo(tmp_path, exports, "good")
    candidate, data = "1", eval_dir
    expected = ""
    if problem == "missing version":
        candidate, expected = "9", "version 9 of model 'm' does not exist"
    elif problem == "no eval data":
        data, expected = tmp_path / "nowhere", "unreadable eval data"
    elif problem == "single class":
        data = tmp_path / "one"
        shutil.copytree(eval_dir / "c0", data / "c0")
        expected = "single class"
    elif problem == "dangling label":
        (model_dir / "labels.json").write_text('{"stable": 7}')
        expected = "label 'stable' points to version 7, which does not exist"
    elif problem == "broken labels":
        (model_dir / "labels.json").write_text('{"stable": ')
        expected = "unreadable labels"
    else:
        (tmp_path / "empty").mkdir()
        candidate, expected = str(tmp_path / "empty"), "not a SavedModel"
    report_file = tmp_path / "report.json"
    code, report = _run_cli(_promote_argv(root, candidate, data, "--report", str(report_file)), capsys)
    assert code == 2 and report["decision"] == "error" and report["exit_code"] == 2
    assert expected in report["reason"]
    assert json.loads(report_file.read_text())["reason"] == report["reason"]
    assert repo.list_versions(model_dir) == [1]


def test_a_gate_that_cannot_be_built_is_an_error_report(tmp_path, exports, eval_dir, capsys):
    root, model_dir = _repo(tmp_path, exports, "good")
    code, report = _run_cli(_promote_argv(root, 1, eval_dir, "--latency-runs", "5"), capsys)
    assert code == 2 and report["decision"] == "error" and "latency_runs must be at least 10" in report["reason"]
    assert report["candidate"]["input"] == "1" and report["labels_after"] is None
    assert not (model_dir / "labels.json").exists()


def test_p99_latency_gate(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "good")
    slow = promote.promote(root, "m", 1, eval_dir,
                           gate=promote.Gate(max_p99_ms=1e-6, latency_runs=20, signature="predict_images"))
    assert slow["decision"] == "rejected" and "p99 latency" in slow["reason"]
    assert slow["latency"]["runs"] == 20 and slow["latency"]["p99_ms"] >= slow["latency"]["p50_ms"] > 0
    fast = promote.promote(root, "m", 1, eval_dir, gate=promote.Gate(max_p99_ms=60_000, latency_runs=20))
    assert fast["decision"] == "promoted" and fast["latency"]["p99_ms"] < 60_000


def test_canary_label_is_independent_of_stable(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "fair", "good")
    promote.promote(root, "m", 1, eval_dir)
    report = promote.promote(root, "m", 2, eval_dir, label="canary")
    assert report["decision"] == "promoted" and report["current"]["version"] is None
    assert _labels(model_dir) == {"stable": 1, "canary": 2}


# -- rollback, labels, history repair ---------------------------------------------------

def test_rollback_walks_back_through_the_history(tmp_path, exports, eval_dir, capsys):
    root, model_dir = _repo(tmp_path, exports, "fair", "good", "good")
    for version in (1, 2, 3):
        assert promote.promote(root, "m", version, eval_dir)["decision"] == "promoted"
    base = ["--repo", str(root), "--model-name", "m"]
    code, result = _run_cli(["rollback", *base], capsys)
    assert code == 0 and (result["from"], result["to"]) == (3, 2)
    assert _labels(model_dir) == {"stable": 2}
    code, result = _run_cli(["rollback", *base], capsys)
    assert code == 0 and _labels(model_dir) == {"stable": 1}
    code, result = _run_cli(["rollback", *base], capsys)
    assert code == 2 and "no earlier version" in result["reason"]
    assert _labels(model_dir) == {"stable": 1}
    # A promotion after rollbacks builds on what the label really holds.
    assert promote.promote(root, "m", 3, eval_dir)["decision"] == "promoted"
    assert repo.label_stack(repo.read_history(model_dir), "stable") == [1, 3]

    assert cli.main(["labels", *base]) == 0
    text = capsys.readouterr().out
    assert "stable     -> 3" in text and "rollback  stable     3 -> 2" in text
    assert cli.main(["labels", *base, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["labels"] == {"stable": 3} and listing["versions"] == [1, 2, 3]
    assert [e["action"] for e in listing["history"]] == ["promote"] * 3 + ["rollback"] * 2 + ["promote"]


def test_rollback_errors(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "good", "good")
    assert "is not set" in promote.rollback(root, "m")["reason"]
    assert promote.rollback(tmp_path, "absent")["exit_code"] == 2
    promote.promote(root, "m", 1, eval_dir)
    promote.promote(root, "m", 2, eval_dir)
    shutil.rmtree(model_dir / "1")
    result = promote.rollback(root, "m")
    assert result["exit_code"] == 2 and "version 1" in result["reason"]
    assert _labels(model_dir) == {"stable": 2}


def test_history_is_repaired_from_labels_json(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "good", "good", "good")
    promote.promote(root, "m", 1, eval_dir)
    promote.promote(root, "m", 2, eval_dir)
    # A hand edit (or a command killed after labels.json, before its history line).
    repo.write_labels(model_dir, {"stable": 3})
    with open(model_dir / contract.HISTORY_FILE, "a") as handle:
        handle.write('{"torn": ')  # a torn last line must not swallow the next entry
    result = promote.rollback(root, "m")
    assert (result["from"], result["to"]) == (3, 2)
    history = repo.read_history(model_dir)
    assert [e["action"] for e in history] == ["promote", "promote", "recovered", "rollback"]
    assert history[2]["stack"] == [1, 2, 3]
    # A hand rollback to an older version cuts the stack back to it.
    repo.write_labels(model_dir, {"stable": 1})
    assert promote.rollback(root, "m")["exit_code"] == 2
    assert repo.label_stack(repo.read_history(model_dir), "stable") == [1]


# -- processes: locking and SIGKILL ------------------------------------------------------

def _spawn(args: list[str], pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop(promote.PAUSE_ENV, None)
    if pause:
        env[promote.PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, "-m", "training.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, text: str) -> None:
    """Read the process's stderr until a line contains ``text`` (fails if it exits first)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return
    proc.wait(30)
    raise AssertionError(f"never printed {text!r}: {''.join(seen)}{proc.stdout.read()}")


def _wait_paused(proc: subprocess.Popen, point: str) -> None:
    _wait_for(proc, f"paused at {point}")


def test_concurrent_promotions_are_serialised(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "fair")
    promote.promote(root, "m", 1, eval_dir)
    first = _spawn(_promote_argv(root, exports["good"], eval_dir), pause="evaluated:8")
    _wait_paused(first, "evaluated")
    # The first holds the lock: the second waits, and decides only after the label has moved.
    second = _spawn(_promote_argv(root, exports["fair"], eval_dir))
    _wait_for(second, "waiting for another promotion")
    assert first.poll() is None, "the first promotion ended before the second reached the lock"
    out_first, _ = first.communicate(timeout=120)
    out_second, err_second = second.communicate(timeout=120)
    assert first.returncode == 0, out_first
    assert second.returncode == 1, err_second
    one, two = json.loads(out_first), json.loads(out_second)
    assert one["candidate"]["version"] == 2 and one["current"]["version"] == 1
    assert two["current"]["version"] == 2 and two["decision"] == "rejected"
    assert _labels(model_dir) == {"stable": 2}
    assert repo.list_versions(model_dir) == [1, 2]


@pytest.mark.parametrize("point", promote.PAUSE_POINTS)
def test_sigkill_at_any_step_leaves_the_repository_consistent(tmp_path, exports, eval_dir, point):
    root, model_dir = _repo(tmp_path, exports, "fair")
    promote.promote(root, "m", 1, eval_dir)
    proc = _spawn(_promote_argv(root, exports["good"], eval_dir), pause=point)
    _wait_paused(proc, point)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    _assert_consistent(model_dir)
    labels = _labels(model_dir)
    expected = {"stable": 2} if point == "labels_written" else {"stable": 1}
    assert labels == expected
    visible = repo.list_versions(model_dir)
    assert visible == ([1] if point in ("locked", "evaluated", "staged") else [1, 2])
    # The next command repairs the history and acts on what labels.json says.
    again = promote.promote(root, "m", exports["good"], eval_dir)
    assert again["exit_code"] == 0
    _assert_consistent(model_dir)
    stack = repo.label_stack(repo.read_history(model_dir), "stable")
    assert stack[-1] == _labels(model_dir)["stable"] and stack[0] == 1
    rolled = promote.rollback(root, "m")
    assert rolled["exit_code"] == 0 and rolled["to"] == stack[-2]


def test_sigkill_at_random_times_leaves_the_repository_consistent(tmp_path, exports, eval_dir):
    root, model_dir = _repo(tmp_path, exports, "fair")
    promote.promote(root, "m", 1, eval_dir)
    rng = random.Random(5)
    for _ in range(3):
        proc = _spawn(_promote_argv(root, exports["good"], eval_dir))
        time.sleep(rng.uniform(1.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        _assert_consistent(model_dir)
    final = promote.promote(root, "m", exports["good"], eval_dir)
    assert final["exit_code"] == 0
    _assert_consistent(model_dir)
    assert repo.label_stack(repo.read_history(model_dir), "stable")[-1] == _labels(model_dir)["stable"]


# -- a running server follows the label ------------------------------------------------

def _status_version(client, label: str) -> str | None:
    response = client.http.get(f"{client.rest}/v1/models/m/labels/{label}", timeout=5)
    if response.status_code != 200:
        return None
    return response.json()["model_version_status"][0]["version"]


def _wait_label(client, label: str, version: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _status_version(client, label) == str(version):
            return
        time.sleep(0.1)
    raise AssertionError(f"label {label} never reached version {version}")


def test_running_server_follows_label_changes_without_restart(tmp_path, exports, eval_dir):
    from tests.serving.server import serving

    root, model_dir = _repo(tmp_path, exports, "fair")
    promote.promote(root, "m", 1, eval_dir)
    image = keras.utils.load_img(sorted((eval_dir / "c2").glob("*.png"))[0])
    body = {"instances": [np.asarray(image, np.float32).tolist()]}
    with serving(model_name="m", model_base_path=str(model_dir), file_system_poll_wait_seconds=0.2) as (_, client):
        _wait_label(client, "stable", 1)
        predict = f"{client.rest}/v1/models/m/labels/stable:predict"
        before = client.http.post(predict, json=body, timeout=30).json()["predictions"][0]
        assert before["class_names"] == "c1"  # "fair" sends class 2 to class 1

        assert promote.promote(root, "m", exports["good"], eval_dir)["decision"] == "promoted"
        _wait_label(client, "stable", 2)
        after = client.http.post(predict, json=body, timeout=30).json()["predictions"][0]
        assert after["class_names"] == "c2"
        assert not np.allclose(before["scores"], after["scores"])

        assert promote.rollback(root, "m")["to"] == 1
        _wait_label(client, "stable", 1)
        again = client.http.post(predict, json=body, timeout=30).json()["predictions"][0]
        np.testing.assert_allclose(again["scores"], before["scores"], rtol=1e-5)
