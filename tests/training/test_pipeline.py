"""training.pipeline: the typed FitConfig, its flags, and one run called without any argv."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from graft import contract
from tests.training.test_fit import write_image_folder
from training import cli, pipeline, preflight

SIZE = 32


def _captured_config(monkeypatch, argv) -> pipeline.FitConfig:
    seen = []
    monkeypatch.setattr(pipeline, "run", seen.append)
    monkeypatch.setattr(preflight, "check_fit", lambda settings: None)  # the folders named here do not exist
    assert cli.main(argv) == 0
    [config] = seen
    return config


def test_fit_flags_become_the_config_and_their_defaults_agree(monkeypatch):
    required = ["fit", "--data", "d", "--repo", "r", "--model-name", "m"]
    assert _captured_config(monkeypatch, required) == pipeline.FitConfig(data="d", repo="r", model_name="m")
    config = _captured_config(monkeypatch, [
        *required, "--val-data", "v", "--image-size", "48", "--no-augment", "--augment-copies", "2",
        "--base", "resnet50", "--weights", "none", "--scenario", "fine-tune", "--head", "seed",
        "--cut-layer", "c", "--freeze-first", "5", "--small-threshold", "7", "--head-epochs", "3",
        "--finetune-epochs", "4", "--batch-size", "8", "--head-lr", "0.01", "--finetune-lr", "0.001",
        "--patience", "2", "--head-patience", "9", "--seed", "11", "--strategy", "mirrored",
        "--mixed-precision", "--log-dir", "tb", "--run-dir", "run"])
    assert config == pipeline.FitConfig(
        data="d", repo="r", model_name="m", val_data="v", image_size=48, augment=False, augment_copies=2,
        base="resnet50", weights="none", scenario="fine-tune", head="seed", cut_layer="c", freeze_first=5,
        small_threshold=7, head_epochs=3, finetune_epochs=4, batch_size=8, head_lr=0.01, finetune_lr=0.001,
        patience=2, head_patience=9, seed=11, strategy="mirrored", mixed_precision=True, log_dir="tb",
        run_dir="run")


def test_every_config_field_is_a_fit_flag():
    parser = cli.build_parser()
    args = parser.parse_args(["fit", "--data", "d", "--repo", "r", "--model-name", "m"])
    assert {field.name for field in dataclasses.fields(pipeline.FitConfig)} <= set(vars(args))


@pytest.mark.parametrize("changes, message", [
    ({"head_epochs": 0}, "head_epochs must be a positive integer"),
    ({"image_size": -1}, "image_size must be a positive integer"),
    ({"augment_copies": -1}, "augment_copies must be >= 0"),
    ({"head_lr": 0.0}, "head_lr must be positive"),
    ({"val_split": 1.0}, "val_split must be between 0 and 1"),
    ({"head": "mlp"}, "unknown head 'mlp'"),
    ({"strategy": "tpu"}, "unknown strategy 'tpu'"),
])
def test_a_config_that_no_data_could_fix_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        pipeline.FitConfig(data="d", repo="r", model_name="m", **changes)


def test_the_config_is_frozen():
    config = pipeline.FitConfig(data="d", repo="r", model_name="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]


def test_run_trains_exports_evaluates_and_reports_from_a_config(tmp_path, capsys):
    data_dir = write_image_folder(tmp_path / "data", per_class=8, seed=5)
    config = pipeline.FitConfig(data=Path(data_dir), repo=tmp_path / "repo", model_name="shapes",
                                base="vgg16", weights="none", scenario="1", cut_layer="block2_pool",
                                image_size=SIZE, head_epochs=1, batch_size=8, run_dir=tmp_path / "run")
    path = pipeline.run(config)
    assert path == str(tmp_path / "repo" / "shapes" / "1")
    assert capsys.readouterr().out.strip().splitlines()[-1] == path
    lineage = contract.read_lineage(path)
    assert lineage["schema_version"] == contract.LINEAGE_SCHEMA_VERSION
    assert lineage["scenario"]["evidence"] == {"chosen_by": "user", "flag": "1"}
    assert lineage["hyper_parameters"]["val_split"] == 0.2 and lineage["dataset"]["val_count"] > 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["version_path"] == path and report["base"] == "vgg16"
    # The same report travels inside the version, its files named relative to it.
    inside = contract.report_path(path)
    carried = json.loads((inside / "report.json").read_text())
    assert carried["evaluation"] == report["evaluation"] and carried["base"] == "vgg16"
    assert carried["files"]["curves_png"] == "training_curves.png"
    for name in ("training_curves.png", "confusion_matrix.png", "confusion_matrix.json"):
        assert (inside / name).stat().st_size > 0
    assert (inside / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
