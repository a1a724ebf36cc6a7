"""graft-train refuses a wrong flag or file before it reads an image or builds a network.

Each case of issue 20 runs through ``cli.main`` in one child process that never
gets to import TensorFlow (training.data, which reads images, and
training.bases, which builds networks, both need it): the child reports the
exit code, stderr and time of every case, and which heavy modules it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.training.conftest import make_image_folder
from training import cli, subcommands
from training.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import contextlib, io, json, sys, time
from training import cli
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "seconds": time.perf_counter() - started})
heavy = [name for name in ("tensorflow", "keras", "PIL.Image") if name in sys.modules]
print(json.dumps({"results": results, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Image folders, broken weight files, a file where a directory belongs, an empty Keras cache."""
    root = tmp_path_factory.mktemp("preflight")
    make_image_folder(root / "data", {"cat": 2, "dog": 2})
    make_image_folder(root / "other", {"cat": 2, "emu": 2})
    (root / "bad.weights.h5").write_bytes(b"not an HDF5 file " * 8)
    (root / "bad.h5").write_bytes(b"garbage " * 8)
    (root / "bad.keras").write_bytes(b"PK, but not a zip " * 8)
    with zipfile.ZipFile(root / "notes.keras", "w") as archive:
        archive.writestr("notes.txt", "a zip archive without a Keras model")
    (root / "a-file").write_text("a file where a directory belongs")
    (root / "broken-version").mkdir()
    (root / "broken-version" / "saved_model.pb").write_bytes(b"\xff" * 64)
    (root / "keras-home").mkdir()
    return root


def _fit(root: Path, *flags: str, weights: str = "none") -> list[str]:
    return ["fit", "--data", str(root / "data"), "--weights", weights, "--image-size", "32", "--scenario", "1",
            "--repo", str(root / "repo"), "--model-name", "m", "--run-dir", str(root / "run"), *flags]


def _cases(root: Path) -> list[tuple[str, list[str], str]]:
    """(case, argv, the flag its one-line error must name)."""
    return [
        ("garbage .weights.h5", _fit(root, weights=str(root / "bad.weights.h5")), "--weights"),
        ("garbage .h5", _fit(root, weights=str(root / "bad.h5")), "--weights"),
        ("existing but broken .keras", _fit(root, weights=str(root / "bad.keras")), "--weights"),
        ("a zip that is no Keras model", _fit(root, weights=str(root / "notes.keras")), "--weights"),
        ("--data nope, default imagenet weights absent", [
            "fit", "--data", str(root / "nope"), "--repo", str(root / "repo"), "--model-name", "m"], "--data"),
        ("--val-data nope", _fit(root, "--val-data", str(root / "nope")), "--val-data"),
        ("--val-data with other classes", _fit(root, "--val-data", str(root / "other")), "--val-data"),
        ("--strategy multiworker without TF_CONFIG", _fit(root, "--strategy", "multiworker"), "--strategy"),
        ("--log-dir under a file", _fit(root, "--log-dir", str(root / "a-file" / "tb")), "--log-dir"),
        ("--scenario 7", _fit(root, "--scenario", "7"), "--scenario"),
        ("--base alexnet", _fit(root, "--base", "alexnet"), "--base"),
        ("aliases parse; the data is what is wrong", [
            "fit", "--data", str(root / "nope"), "--scenario", "Fine-Tune", "--base", " VGG16",
            "--repo", str(root / "repo"), "--model-name", "m"], "--data"),
        ("--freeze-first with scenario 4", _fit(root, "--scenario", "full", "--freeze-first", "5"), "--freeze-first"),
        ("--image-size under the base's minimum", _fit(root, "--image-size", "16"), "--image-size"),
        ("--head-epochs 0", _fit(root, "--head-epochs", "0"), "--head-epochs"),
        ("--repo is a file", _fit(root, "--repo", str(root / "a-file")), "--repo"),
        ("--run-dir is a file", _fit(root, "--run-dir", str(root / "a-file")), "--run-dir"),
        ("evaluate --model nope", [
            "evaluate", "--model", str(root / "nope"), "--data", str(root / "data")], "--model"),
        ("evaluate --model with a broken saved_model.pb", [
            "evaluate", "--model", str(root / "broken-version"), "--data", str(root / "data")], "--model"),
        ("demo --candidate-images-per-class below --images-per-class", [
            "demo", "--images-per-class", "50", "--candidate-images-per-class", "10"],
         "--candidate-images-per-class"),
        ("demo --grpc-port 70000", ["demo", "--grpc-port", "70000"], "--grpc-port"),
    ]


@pytest.fixture(scope="module")
def outcomes(workspace):
    """Every case's result, from one child process without TF_CONFIG and with an empty Keras cache."""
    cases = _cases(workspace)
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env["KERAS_HOME"] = str(workspace / "keras-home")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([argv for _, argv, _ in cases])],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return {name: (argv[0], flag, result) for (name, argv, flag), result in zip(cases, report["results"])}, \
        report["heavy"]


@pytest.mark.parametrize("case", [name for name, _, _ in _cases(Path("/"))])
def test_each_user_error_is_one_line_naming_its_flag_with_exit_2(outcomes, case):
    results, _ = outcomes
    command, flag, result = results[case]
    assert result["code"] == 2, result
    assert result["stderr"].startswith(f"graft-train {command}: error: argument {flag}: "), result["stderr"]
    assert result["stderr"].count("\n") == 1 and "Traceback" not in result["stderr"], result["stderr"]
    assert result["stdout"] == "", result["stdout"]
    assert "File not found" not in result["stderr"]
    # In-process, after the first import: what the check itself costs (a fit that gets this far costs minutes).
    assert result["seconds"] < 2.0, result


def test_no_case_read_an_image_or_built_a_network(outcomes):
    _, heavy = outcomes
    assert heavy == []


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("a bug, not a usage error")

    monkeypatch.setattr(subcommands, "run_labels", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["labels", "--repo", "r", "--model-name", "m"])


def test_a_usage_error_reads_like_argparse():
    assert str(UsageError("--weights", "bad\nfile")) == "argument --weights: bad file"
    assert str(UsageError(None, "no flag").naming("--data")) == "argument --data: no flag"
    assert UsageError("--val-data", "x").naming("--data").flag == "--val-data"
    assert isinstance(UsageError("--x", "y"), ValueError)  # library callers that catch ValueError keep working
