"""Tests for training.report and the metric arithmetic in training.evaluate."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from training import report
from training.evaluate import EvalResult, classification_metrics
from sklearn import metrics as sklearn_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _evaluation(labels, predictions, names):
    accuracy, per_class, confusion = classification_metrics(labels, predictions, names)
    scores = np.eye(len(names), dtype=np.float32)[predictions]
    return EvalResult(accuracy=accuracy, class_names=list(names), per_class=per_class,
                      confusion=confusion, labels=np.asarray(labels), predictions=np.asarray(predictions),
                      scores=scores, files=[f"f{i}.png" for i in range(len(labels))])


def test_metrics_by_hand():
    names = ["cat", "dog", "owl"]
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 0, 0]
    accuracy, per_class, confusion = classification_metrics(labels, predictions, names)
    assert accuracy == pytest.approx(3 / 6)
    assert confusion.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert per_class["cat"] == {"precision": 0.5, "recall": pytest.approx(2 / 3), "support": 3}
    assert per_class["dog"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    # Never predicted, so precision has no denominator: reported as 0, not NaN.
    assert per_class["owl"] == {"precision": 0.0, "recall": 0.0, "support": 1}


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 200)
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 4, 200))
    names = ["a", "b", "c", "d"]
    accuracy, per_class, confusion = classification_metrics(labels, predictions, names)
    assert accuracy == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
    np.testing.assert_array_equal(confusion, sklearn_metrics.confusion_matrix(labels, predictions))
    precision = sklearn_metrics.precision_score(labels, predictions, average=None, zero_division=0)
    recall = sklearn_metrics.recall_score(labels, predictions, average=None, zero_division=0)
    for i, name in enumerate(names):
        assert per_class[name]["precision"] == pytest.approx(precision[i])
        assert per_class[name]["recall"] == pytest.approx(recall[i])


def test_fit_report_files(tmp_path):
    history = {
        "head": {"loss": [1.0, 0.7], "accuracy": [0.5, 0.7], "val_loss": [0.9, 0.8], "val_accuracy": [0.6, 0.65]},
        "finetune": {"loss": [0.5], "accuracy": [0.8], "val_loss": [0.6], "val_accuracy": [0.75]},
    }
    evaluation = _evaluation([0, 1, 1], [0, 1, 0], ["x", "y"])
    files = report.write_fit_report(tmp_path / "run", history=history,
                                    summary={"version_path": "/r/m/1", "scenario": 2}, evaluation=evaluation)
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert data["version_path"] == "/r/m/1"
    assert data["history"]["finetune"]["val_accuracy"] == [0.75]
    assert data["evaluation"]["accuracy"] == pytest.approx(2 / 3)
    assert data["evaluation"]["per_class"]["y"]["recall"] == 0.5
    assert data["notes"] == []
    for key in ("curves_png", "confusion_png"):
        assert open(files[key], "rb").read(8) == PNG_MAGIC
    confusion = json.loads(open(files["confusion_json"]).read())
    assert confusion["matrix"] == [[1, 0], [1, 1]] and confusion["class_names"] == ["x", "y"]


def test_pngs_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail, like an uninstalled package.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    evaluation = _evaluation([0, 1], [0, 1], ["x", "y"])
    files = report.write_eval_report(tmp_path, evaluation, summary={"model": "p"})
    assert set(files) == {"confusion_json", "report"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert any("matplotlib" in note for note in data["notes"])
    assert data["evaluation"]["accuracy"] == 1.0 and data["model"] == "p"
    assert not (tmp_path / "confusion_matrix.png").exists()


def test_format_evaluation_lists_every_class():
    text = report.format_evaluation(_evaluation([0, 0, 1], [0, 1, 1], ["short", "a-longer-name"]))
    lines = text.splitlines()
    assert lines[0] == "accuracy: 0.6667 (3 images)"
    assert lines[2].split() == ["short", "1.0000", "0.5000", "2"]
    assert lines[3].split() == ["a-longer-name", "0.5000", "1.0000", "1"]
