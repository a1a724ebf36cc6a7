"""Run reports: report.json, training curves, confusion matrix (PNG + JSON), text summaries.

matplotlib belongs to the optional ``demo`` extra: it is imported lazily and,
when missing, the PNGs are skipped and report.json says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REPORT_FILE = "report.json"
CURVES_FILE = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_json(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON (numpy values converted) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, or None when matplotlib is not installed."""
    # Optional (graft[demo]): matplotlib draws the PNGs.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    # A bare Figure avoids pyplot's global state and any interactive backend.
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_curves(history: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike) -> bool:
    """Plot loss and accuracy (train and validation) across phases into one PNG.

    ``history`` maps phase name -> Keras ``History.history``. Epochs of successive
    phases follow each other on the x axis, with a dashed line at each phase start.
    Returns False (writing nothing) when matplotlib is missing.
    """
    figure = _figure(10, 4)
    if figure is None:
        return False
    axes = figure.subplots(1, 2)
    offset = 0
    for phase, metrics in history.items():
        epochs = max((len(v) for v in metrics.values()), default=0)
        x = np.arange(offset + 1, offset + epochs + 1)
        for ax, key in zip(axes, ("loss", "accuracy")):
            for prefix, style in (("", "-"), ("val_", "--")):
                values = metrics.get(prefix + key)
                if values:
                    ax.plot(x[:len(values)], values, style, marker="o", markersize=3,
                            label=f"{phase} {prefix}{key}".replace("_", " "))
        if offset:
            for ax in axes:
                ax.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=1)
        offset += epochs
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    return True


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> bool:
    """Draw the confusion matrix (rows true, columns predicted) with counts. False if no matplotlib."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    size = max(4.0, 0.5 * n + 2)
    figure = _figure(size, size)
    if figure is None:
        return False
    ax = figure.subplots()
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max() / 2 if confusion.size else 0
    if n <= 40:  # past that the numbers are unreadable anyway
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if confusion[i, j] > threshold else "black")
    figure.tight_layout()
    figure.savefig(path)
    return True


def confusion_dict(evaluation) -> dict:
    """The confusion matrix as JSON-ready data (rows true, columns predicted)."""
    return {
        "class_names": list(evaluation.class_names),
        "rows": "true class",
        "columns": "predicted class",
        "matrix": np.asarray(evaluation.confusion).tolist(),
    }


def _write_evaluation(out: Path, evaluation, notes: list[str], files: dict[str, str]) -> None:
    files["confusion_json"] = str(write_json(out / CONFUSION_JSON, confusion_dict(evaluation)))
    if plot_confusion(evaluation.confusion, evaluation.class_names, out / CONFUSION_PNG):
        files["confusion_png"] = str(out / CONFUSION_PNG)
    else:
        notes.append("confusion_matrix.png skipped: matplotlib is not installed (pip install 'graft[demo]')")


def write_fit_report(run_dir: str | os.PathLike, *, history: Mapping[str, Mapping[str, Sequence[float]]],
                     summary: Mapping, evaluation=None) -> dict[str, str]:
    """Write a training run's report into ``run_dir`` and return {kind: path}.

    ``summary`` (decisions, metrics, version path, ...) goes into report.json with
    the per-phase history and, when given, the validation ``evaluation``
    (training.evaluate.EvalResult) with its confusion matrix files.
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    files: dict[str, str] = {}
    if plot_curves(history, out / CURVES_FILE):
        files["curves_png"] = str(out / CURVES_FILE)
    else:
        notes.append("training_curves.png skipped: matplotlib is not installed (pip install 'graft[demo]')")
    if evaluation is not None:
        _write_evaluation(out, evaluation, notes, files)
    report = dict(summary)
    report["history"] = {phase: dict(metrics) for phase, metrics in history.items()}
    if evaluation is not None:
        report["evaluation"] = evaluation.to_dict()
    report["files"] = dict(files)
    report["notes"] = notes
    files["report"] = str(write_json(out / REPORT_FILE, report))
    return files


def write_eval_report(report_dir: str | os.PathLike, evaluation, *, summary: Mapping | None = None) -> dict[str, str]:
    """Write an evaluation's report.json and confusion matrix (PNG + JSON); return {kind: path}."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    files: dict[str, str] = {}
    _write_evaluation(out, evaluation, notes, files)
    report = dict(summary or {})
    report["evaluation"] = evaluation.to_dict()
    report["files"] = dict(files)
    report["notes"] = notes
    files["report"] = str(write_json(out / REPORT_FILE, report))
    return files


def format_evaluation(evaluation) -> str:
    """A plain-text table: accuracy, then precision / recall / support per class."""
    width = max([len("class")] + [len(name) for name in evaluation.class_names])
    lines = [f"accuracy: {evaluation.accuracy:.4f} ({evaluation.count} images)",
             f"{'class':<{width}}  precision  recall  support"]
    for name in evaluation.class_names:
        row = evaluation.per_class[name]
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['support']:7d}")
    return "\n".join(lines)
