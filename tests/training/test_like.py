"""Trunk fingerprints of real fits, and ``graft-train fit --like``: joining another model's trunk, or a clear refusal.

The fits run VGG16 cut early at 32 px on tiny weights files (the first two
blocks, random values), so each takes seconds; the refusals need no training.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from graft import contract
from tests.training.conftest import randomize, write_legacy_h5
from tests.training.test_fit import write_image_folder
from training import cli, pipeline, reference
from training.bases import build_trunk, get_base
from training.errors import UsageError

SIZE = 32
VGG = get_base("vgg16")


def _weights_file(path: Path, seed: int) -> str:
    trunk = build_trunk(VGG, SIZE, cut_layer="block2_pool")
    randomize(trunk, seed)
    return write_legacy_h5(trunk, str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two weights files, two data sets, and the fits whose fingerprints the tests compare."""
    root = tmp_path_factory.mktemp("like")
    files = {"w1": _weights_file(root / "w1.h5", 1), "w2": _weights_file(root / "w2.h5", 2)}
    data = {"one": write_image_folder(root / "one", per_class=6, seed=1),
            "two": write_image_folder(root / "two", classes=("a", "b"), per_class=6, seed=2)}

    def fit(model: str, data_name: str, **changes) -> Path:
        config = pipeline.FitConfig(**{
            "data": data[data_name], "repo": root / "repo", "model_name": model, "base": "vgg16",
            "weights": files["w1"], "scenario": "3", "cut_layer": "block2_pool", "image_size": SIZE,
            "head_epochs": 1, "batch_size": 8, "augment": False, "run_dir": root / "runs" / model, **changes})
        return Path(pipeline.run(config))

    fits = {"reference": fit("ref", "one"),                       # ref/1
            "other weights": fit("ref", "one", weights=files["w2"]),  # ref/2, the latest
            "other data": fit("other", "two"),
            "other cut": fit("cut", "one", cut_layer="block1_pool"),
            "other size": fit("size", "one", image_size=40)}
    return root, files, data, fits


def _fingerprint(version: Path) -> str:
    return contract.trunk_of(contract.read_lineage(version))["fingerprint"]


def test_fits_on_one_trunk_share_a_fingerprint_and_any_other_trunk_differs(world):
    _, _, _, fits = world
    reference_print = _fingerprint(fits["reference"])
    assert _fingerprint(fits["other data"]) == reference_print
    for name in ("other weights", "other cut", "other size"):
        assert _fingerprint(fits[name]) != reference_print, name
    assert len({_fingerprint(fits[name]) for name in ("other weights", "other cut", "other size")}) == 3


def _run(capsys, argv) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _fit_args(root: Path, data_dir: str, model: str, *extra: str) -> list[str]:
    return ["fit", "--data", data_dir, "--repo", str(root / "repo"), "--model-name", model, "--head-epochs", "1",
            "--batch-size", "8", "--no-augment", "--run-dir", str(root / "runs" / f"{model}-cli"), *extra]


def test_like_a_model_joins_its_stable_version_else_its_latest(world, capsys):
    root, _, data, fits = world
    model_dir = root / "repo" / "ref"
    # No labels: the latest version, ref/2 (the other weights file).
    code, out, err = _run(capsys, _fit_args(root, data["two"], "joined", "--like", str(model_dir)))
    assert code == 0, err
    latest = Path(out.strip().splitlines()[-1])
    assert f"like: {fits['other weights']} (latest)" in out
    assert _fingerprint(latest) == _fingerprint(fits["other weights"])
    # With a stable label: the version it names, ref/1.
    contract.labels_path(model_dir).write_text(json.dumps({"stable": 1}))
    try:
        code, out, err = _run(capsys, _fit_args(root, data["two"], "joined", "--like", str(model_dir)))
    finally:
        contract.labels_path(model_dir).unlink()
    assert code == 0, err
    joined = Path(out.strip().splitlines()[-1])
    assert joined == root / "repo" / "joined" / "2"
    assert f"like: {fits['reference']} (label stable)" in out
    lineage = contract.read_lineage(joined)
    assert contract.trunk_of(lineage) == contract.trunk_of(contract.read_lineage(fits["reference"]))
    assert lineage["hyper_parameters"]["like"] == str(fits["reference"])
    assert lineage["hyper_parameters"]["image_size"] == SIZE and lineage["scenario"]["cut_layer"] == "block2_pool"
    assert lineage["class_names"] == ["a", "b"]
    # It carries the split like any frozen-trunk version.
    assert contract.shared_parts(joined) is not None


def _copy_with_lineage(world, name: str, change) -> Path:
    """A copy of the reference version (as another model's version 1) whose lineage ``change`` edits."""
    root, _, _, fits = world
    target = root / "edited" / name / "1"
    shutil.copytree(fits["reference"], target)
    lineage = contract.read_lineage(target)
    change(lineage)
    contract.lineage_path(target).write_text(json.dumps(lineage))
    return target


def _refused(capsys, world, like: str | Path, *extra: str) -> str:
    root, _, data, _ = world
    before = sorted((root / "repo").iterdir())
    code, out, err = _run(capsys, _fit_args(root, data["two"], "refused", "--like", str(like), *extra))
    assert code == 2, out + err
    assert err.startswith("graft-train fit: error: argument --like: ") and "Traceback" not in err
    assert sorted((root / "repo").iterdir()) == before and not (root / "repo" / "refused").exists()
    return err


def test_a_reference_whose_trunk_trained_is_refused(world, capsys):
    version = _copy_with_lineage(world, "trained", lambda lineage: lineage.pop("trunk"))
    assert "declares no trunk: its trunk was trained" in _refused(capsys, world, version)


def test_a_reference_on_random_weights_is_refused(world, capsys):
    version = _copy_with_lineage(world, "random", lambda lineage: lineage["weights"].update(
        kind="none", path=None, sha256=None))
    assert "random weights" in _refused(capsys, world, version)


def test_a_weights_file_that_changed_or_went_is_refused(world, capsys):
    root, files, _, _ = world
    copy = root / "w1-copy.h5"
    shutil.copyfile(files["w1"], copy)
    version = _copy_with_lineage(world, "changed", lambda lineage: lineage["weights"].update(path=str(copy)))
    assert contract.read_lineage(version)["weights"]["sha256"] == contract.read_lineage(
        world[3]["reference"])["weights"]["sha256"]
    trunk = build_trunk(VGG, SIZE, cut_layer="block2_pool")
    randomize(trunk, 7)
    write_legacy_h5(trunk, str(copy))
    assert "changed since" in _refused(capsys, world, version)
    copy.unlink()
    assert "does not exist" in _refused(capsys, world, version)


def test_a_trunk_that_rebuilds_to_another_fingerprint_is_refused_before_training(world, capsys):
    def drift(lineage):
        # The trunk's fingerprint is also its last segment's.
        lineage["trunk"].update(fingerprint="ab" * 32)
        lineage["trunk"]["segments"][-1].update(fingerprint="ab" * 32)
    version = _copy_with_lineage(world, "drifted", drift)
    err = _refused(capsys, world, version)
    assert "has fingerprint" in err and "not the reference's abababababab" in err


@pytest.mark.parametrize("flags, needle", [
    (("--base", "resnet50"), "--base resnet50 contradicts"),
    (("--image-size", "48"), "--image-size 48 contradicts"),
    (("--cut-layer", "block1_pool"), "--cut-layer block1_pool contradicts"),
    (("--weights", "none"), "--weights none contradicts"),
    (("--scenario", "fine-tune"), "trains the trunk"),
    (("--scenario", "4"), "trains the trunk"),
])
def test_flags_that_contradict_the_reference_are_refused(world, capsys, flags, needle):
    assert needle in _refused(capsys, world, world[3]["reference"], *flags)


def test_flags_that_agree_with_the_reference_are_accepted(world):
    _, files, _, fits = world
    like = reference.read_reference(fits["reference"])
    agreeing = pipeline.FitConfig(data="d", repo="r", model_name="m", base="VGG16", weights=files["w1"],
                                  image_size=SIZE, cut_layer="block2_pool", scenario="1")
    assert like.settings_for(agreeing) == {"base": "vgg16", "weights": files["w1"], "image_size": SIZE,
                                           "cut_layer": "block2_pool", "scenario": "1"}
    defaults = pipeline.FitConfig(data="d", repo="r", model_name="m")
    assert like.settings_for(defaults)["scenario"] == "3"


def test_paths_that_name_no_joinable_version_are_refused(world, tmp_path, capsys):
    root = world[0]
    assert "does not exist" in _refused(capsys, world, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "nor a model directory with versions" in _refused(capsys, world, tmp_path / "empty")
    pointing = root / "edited" / "pointing"
    shutil.copytree(world[3]["reference"], pointing / "1")
    contract.labels_path(pointing).write_text(json.dumps({"stable": 9}))
    assert "label 'stable' points nowhere" in _refused(capsys, world, pointing)


def test_like_defaults_are_graft_train_fits_defaults():
    fields = {field.name: field.default for field in dataclasses.fields(pipeline.FitConfig)}
    parsed = vars(cli.build_parser().parse_args(["fit", "--data", "d", "--repo", "r", "--model-name", "m"]))
    for name, value in reference.LIKE_DEFAULTS.items():
        assert fields[name] == value == parsed[name], name
    assert fields["like"] is None and parsed["like"] is None


def test_find_version_reads_a_version_a_label_or_the_latest(world):
    root, _, _, fits = world
    assert reference.find_version(fits["reference"]) == (fits["reference"], "version")
    assert reference.find_version(root / "repo" / "ref") == (fits["other weights"], "latest")
    with pytest.raises(UsageError, match="--like"):
        reference.find_version(root / "repo" / "missing")
    assert np.isscalar(reference.read_reference(fits["reference"]).image_size)
