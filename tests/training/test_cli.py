"""End-to-end tests of graft-train: fit (tiny, real) -> exported version -> evaluate, and its errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.test_fit import write_image_folder
from training import cli

SIZE = 32


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data_dir = write_image_folder(root / "data", per_class=14, seed=3)
    return root, data_dir


@pytest.fixture(scope="module")
def fitted(workspace):
    root, data_dir = workspace
    argv = ["fit", "--data", data_dir, "--base", "vgg16", "--weights", "none", "--scenario", "auto",
            "--repo", str(root / "repo"), "--model-name", "shapes", "--image-size", str(SIZE),
            "--head-epochs", "2", "--batch-size", "8", "--seed", "1", "--run-dir", str(root / "run")]
    code, out, err = _run(argv)
    assert code == 0, err
    return root, out


def test_help_lists_the_subcommands():
    help_text = cli.build_parser().format_help()
    assert "fit" in help_text and "evaluate" in help_text
    with pytest.raises(SystemExit) as exc:
        _run(["fit", "--help"])
    assert exc.value.code == 0


def test_help_imports_no_tensorflow():
    code = ("import sys; from training import cli; cli.build_parser().format_help(); "
            "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    proc = subprocess.run([sys.executable, "-m", "training.cli", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "promote" in proc.stdout and "demo" in proc.stdout


def test_subcommands_are_registered_in_one_list():
    extra = cli.Command("hello", "say hello", lambda p: p.add_argument("--who", default="x"),
                        lambda args: print(f"hello {args.who}") or 0)
    parser = cli.build_parser([*cli.commands(), extra])
    args = parser.parse_args(["hello", "--who", "graft"])
    assert args.command == "hello" and args._run(args) == 0
    assert [c.name for c in cli.commands()][:2] == ["fit", "evaluate"]


def test_fit_prints_decisions_and_ends_with_the_version_path(fitted):
    root, out = fitted
    lines = out.strip().splitlines()
    version = Path(lines[-1])
    assert version == root / "repo" / "shapes" / "1"
    assert (version / "saved_model.pb").is_file()
    for needle in ("data:", "split:", "base: vgg16 at 32x32", "weights: none (random initialisation)", "scenario:", "auto:",
                   "cut:", "frozen in head:", "phases:", "head on cached features", "accuracy:"):
        assert needle in out, needle
    lineage = json.loads((version / "assets.extra" / "graft.json").read_text())
    evidence = lineage["scenario"]["evidence"]
    assert evidence["chosen_by"] == "auto" and evidence["size"] == "small"
    assert set(evidence["probe_scores"]) == set(lineage["scenario"]["evidence"]["probe_scores"])
    assert lineage["scenario"]["scenario"] in (1, 3)
    assert lineage["weights"]["kind"] == "none" and lineage["base"] == "vgg16"
    assert lineage["hyper_parameters"]["image_size"] == SIZE
    assert len(lineage["dataset"]["fingerprint"]) == 64
    assert lineage["frozen_layers"]["head"]  # every weighted trunk layer stays frozen in scenario 1/3
    # A frozen trunk is declared, and the run prints its fingerprint.
    trunk = lineage["trunk"]
    assert trunk["base"] == "vgg16" and trunk["input_shape"] == [SIZE, SIZE, 3]
    assert trunk["cut_layer"] == lineage["scenario"]["cut_layer"]
    assert f"trunk: {trunk['fingerprint']}" in out
    if len(trunk["segments"]) > 1:
        assert f"trunk segments: {len(trunk['segments'])}, ending at {trunk['segments'][0]['cut_layer']}" in out


def test_fit_report_agrees_with_the_savedmodel(fitted):
    root, _ = fitted
    report = json.loads((root / "run" / "report.json").read_text())
    assert report["version_path"].endswith("/shapes/1")
    # Keras' own score of the assembled model and the exported SavedModel's agree.
    assert report["evaluation"]["accuracy"] == pytest.approx(report["metrics"]["val_accuracy"], abs=1e-6)
    assert set(report["history"]) == {"head"}
    assert (root / "run" / "confusion_matrix.json").is_file()
    if not report["notes"]:
        assert (root / "run" / "training_curves.png").is_file()
        assert (root / "run" / "confusion_matrix.png").is_file()


def test_evaluate_cli_writes_the_report(fitted, workspace):
    root, data_dir = workspace
    version = root / "repo" / "shapes" / "1"
    code, out, err = _run(["evaluate", "--model", str(version), "--data", data_dir,
                           "--report-dir", str(root / "eval"), "--signature", "predict_images"])
    assert code == 0, err
    assert out.splitlines()[1].startswith("accuracy: ")
    for name in ("dots", "stripes", "warm"):
        assert any(line.split()[:1] == [name] for line in out.splitlines())
    report = json.loads((root / "eval" / "report.json").read_text())
    evaluation = report["evaluation"]
    assert evaluation["count"] == 42 and evaluation["signature"] == "predict_images"
    confusion = np.array(json.loads((root / "eval" / "confusion_matrix.json").read_text())["matrix"])
    assert confusion.sum() == 42
    assert evaluation["accuracy"] == pytest.approx(np.trace(confusion) / 42)


def test_fit_fine_tune_alias_seed_head_and_val_data_gives_version_two(fitted, workspace, tmp_path):
    root, data_dir = workspace
    val_dir = write_image_folder(tmp_path / "val", per_class=4, seed=9)
    code, out, err = _run([
        "fit", "--data", data_dir, "--val-data", val_dir, "--base", "vgg16", "--weights", "none",
        "--scenario", "fine-tune", "--head", "seed", "--freeze-first", "5", "--cut-layer", "block2_pool",
        "--repo", str(root / "repo"), "--model-name", "shapes", "--image-size", str(SIZE),
        "--head-epochs", "1", "--finetune-epochs", "1", "--batch-size", "16", "--no-augment",
        "--run-dir", str(tmp_path / "run")])
    assert code == 0, err
    version = Path(out.strip().splitlines()[-1])
    assert version == root / "repo" / "shapes" / "2"
    assert "scenario: 2 fine-tune (chosen by --scenario)" in out
    assert "except its first 5 layers" in out
    lineage = json.loads((version / "assets.extra" / "graft.json").read_text())
    assert lineage["scenario"]["head"] == "seed" and lineage["scenario"]["cut_layer"] == "block2_pool"
    assert [p["name"] for p in lineage["metrics"]["phases"]] == ["head", "fine-tune"]
    assert lineage["dataset"]["val_count"] == 12
    assert len(lineage["frozen_layers"]["fine-tune"]) < len(lineage["frozen_layers"]["head"])
    assert "trunk" not in lineage and "trunk: trained, so this version declares none" in out


@pytest.mark.parametrize("case", ["missing", "single-class", "empty-class"])
def test_bad_data_exits_2_without_traceback(tmp_path, case):
    data_dir = tmp_path / "data"
    if case == "single-class":
        write_image_folder(data_dir, classes=("only",), per_class=3)
    elif case == "empty-class":
        write_image_folder(data_dir, classes=("a", "b"), per_class=3)
        (data_dir / "c").mkdir()
    code, out, err = _run(["fit", "--data", str(data_dir), "--weights", "none", "--repo", str(tmp_path / "r"),
                           "--model-name", "m", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert err.startswith("graft-train fit: error: ") and "Traceback" not in err
    assert str(data_dir) in err
    assert not (tmp_path / "r").exists()


def test_console_entry_reports_errors_on_stderr(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "evaluate", "--model", str(tmp_path / "nope"),
         "--data", str(tmp_path / "nodata")],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "graft-train evaluate: error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "training.cli", "fit", "--data", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--repo" in proc.stderr  # argparse's own usage error, in one line
    assert proc.stderr.startswith("graft-train fit: error: ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "16"], "argument --image-size: 16 is below vgg16's minimum of 32"),
    (["--model-name", "../escape"], "argument --model-name: invalid model name"),
    (["--weights", "imagenet"], "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    # The one check that builds the architecture (without weights), still before the scan.
    (["--cut-layer", "block9_pool", "--image-size", "32"], "argument --cut-layer: unknown cut layer 'block9_pool'"),
])
def test_bad_flags_exit_2_before_reading_data(tmp_path, monkeypatch, flags, message):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # an empty cache: imagenet is absent
    data_dir = write_image_folder(tmp_path / "data", per_class=2)
    argv = ["fit", "--data", data_dir, "--weights", "none", "--repo", str(tmp_path / "r"),
            "--model-name", "m", "--run-dir", str(tmp_path / "run"), *flags]
    code, out, err = _run(argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert "data:" not in out  # failed before the image scan


@pytest.mark.parametrize("flags, flag", [(["--scenario", "transfer"], "--scenario"), (["--base", "alexnet"], "--base")])
def test_closed_sets_are_argparse_choices(tmp_path, flags, flag):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--data", str(tmp_path), "--repo", str(tmp_path), "--model-name", "m", *flags])
    assert exc.value.code == 2
    assert err.getvalue().startswith(f"graft-train fit: error: argument {flag}: invalid choice")
    assert err.getvalue().count("\n") == 1


def test_evaluate_refuses_classes_the_model_does_not_know(fitted, tmp_path):
    root, _ = fitted
    data_dir = write_image_folder(tmp_path / "other", classes=("dots", "zebras"), per_class=1)
    code, out, err = _run(["evaluate", "--model", str(root / "repo" / "shapes" / "1"), "--data", data_dir])
    assert code == 2 and out == ""
    assert err.startswith("graft-train evaluate: error: argument --data: classes not known to the model")
    assert "zebras" in err and err.count("\n") == 1
