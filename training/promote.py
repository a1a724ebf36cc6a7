"""Promotion: gate a candidate version against the labelled one, then move the label; and rollback.

``promote`` evaluates the candidate and the version a label points at on the
same held-out images through the exported SavedModel signature the server runs
(training.evaluate), checks that the candidate's signatures and classes match
the current version's (training.signatures), optionally measures its p99
latency in-process, and then:

- promoted (exit 0): an export directory is first published as the next version
  (hidden staging copy + rename), ``labels.json`` is replaced atomically, and a
  line is appended to the label history (all through training.repo);
- rejected (exit 1): nothing changes;
- error (exit 2): a missing version, unreadable data, a label pointing nowhere...

Every outcome yields the same JSON report. Promotions and rollbacks on one model
hold a file lock for their whole read-decide-write sequence, so concurrent runs
are serialised and never decide against a label that has since moved.

Crash consistency: each step is atomic on its own (rename, replace, one
``O_APPEND`` write), and the history is reconciled with ``labels.json`` at the
start of every command, so a SIGKILL between two steps leaves a repository the
server reads correctly and the next command repairs the history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from filelock import Timeout

from graft import contract
from training import repo as model_repo
from training import shadow as live
from training.signatures import signature_differences

EXIT_PROMOTED = 0
EXIT_REJECTED = 1
EXIT_ERROR = 2
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
EVAL_SIGNATURES = ("serving_default", "predict_images", "classify")
# Fault-injection hook for the crash-consistency tests: when it names a step,
# the process announces the step on stderr and sleeps there, so a test can
# SIGKILL it at exactly that point.
PAUSE_ENV = "GRAFT_PROMOTE_PAUSE_AT"
PAUSE_POINTS = ("locked", "evaluated", "staged", "published", "labels_written")


class PromotionError(Exception):
    """A problem that prevents any decision (exit 2): the message names it."""


@dataclasses.dataclass(frozen=True)
class Gate:
    """What a candidate must satisfy to be promoted.

    ``min_delta``: candidate metric minus current metric must be at least this.
    ``max_p99_ms``: when set, the candidate's single-image p99 latency limit.
    ``signature``: the exported entry point used for evaluation and latency.
    ``shadow``: when set, the live comparison a graft-serve shows must pass too (training.shadow).
    """

    metric: str = "accuracy"
    min_delta: float = 0.0
    max_p99_ms: float | None = None
    allow_signature_change: bool = False
    signature: str = "serving_default"
    latency_runs: int = 100
    batch_size: int = 32
    shadow: live.ShadowGate | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.signature not in EVAL_SIGNATURES:
            raise ValueError(f"unknown signature {self.signature!r}; choose one of {', '.join(EVAL_SIGNATURES)}")
        if self.max_p99_ms is not None and not self.max_p99_ms > 0:
            raise ValueError(f"max_p99_ms must be positive, got {self.max_p99_ms}")
        if self.latency_runs < 10:
            raise ValueError(f"latency_runs must be at least 10, got {self.latency_runs}")


def _pause(point: str) -> None:
    # "<point>" sleeps for an hour (the test kills the process); "<point>:<seconds>" then goes on.
    name, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if name == point:
        print(f"graft-promote paused at {point}", file=sys.stderr, flush=True)
        time.sleep(float(seconds) if seconds else 3600.0)


# -- metrics ------------------------------------------------------------------

def metric_value(evaluation, metric: str) -> float:
    """``metric`` of a training.evaluate.EvalResult, over the classes present in the data.

    ``balanced_accuracy`` is the mean recall, ``macro_f1`` the mean F1; both
    average over the classes with at least one image.
    """
    if metric == "accuracy":
        return float(evaluation.accuracy)
    present = [row for row in evaluation.per_class.values() if row["support"] > 0]
    if not present:
        raise ValueError("no class has images: the metric is undefined")
    if metric == "balanced_accuracy":
        return float(np.mean([row["recall"] for row in present]))
    if metric == "macro_f1":
        scores = []
        for row in present:
            total = row["precision"] + row["recall"]
            scores.append(2 * row["precision"] * row["recall"] / total if total else 0.0)
        return float(np.mean(scores))
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def chance_level(labels: Sequence[int]) -> float:
    """The accuracy of always answering the most common class (1/C for balanced data)."""
    labels = np.asarray(labels)
    if not len(labels):
        return 0.0
    return float(np.bincount(labels).max() / len(labels))


# -- the gate's inputs ----------------------------------------------------------------

def _read_labels(model_directory: Path) -> dict[str, int]:
    try:
        return contract.read_labels(model_directory) or {}
    except ValueError as exc:
        raise PromotionError(f"unreadable labels: {exc}") from exc


def _load_eval_data(eval_data: str | os.PathLike):
    # Heavy (TensorFlow): training.data builds tf.data pipelines.
    from training.data import scan_image_folder

    try:
        images = scan_image_folder(eval_data)
    except (ValueError, OSError) as exc:
        raise PromotionError(f"unreadable eval data {os.fspath(eval_data)}: {exc}") from exc
    return images


def _evaluate(path: Path, images, gate: Gate, who: str):
    # Heavy (TensorFlow): evaluation loads the SavedModel.
    from training.evaluate import evaluate_savedmodel

    try:
        return evaluate_savedmodel(path, images, signature=gate.signature, batch_size=gate.batch_size)
    except Exception as exc:  # a broken SavedModel can raise anything TF has
        raise PromotionError(f"cannot evaluate the {who} at {path}: {type(exc).__name__}: {exc}") from exc


def _summary(evaluation, metric: str) -> dict:
    return {"accuracy": evaluation.accuracy, metric: metric_value(evaluation, metric),
            "count": evaluation.count}


# -- promote ------------------------------------------------------------------------

def _new_report(repo, model_name, candidate, eval_data, label, gate: Gate) -> dict:
    return {
        "decision": None, "exit_code": None, "reason": "",
        "model_name": model_name, "repo": os.fspath(repo), "label": label,
        "metric": gate.metric, "min_delta": gate.min_delta, "signature": gate.signature,
        "candidate": {"input": os.fspath(candidate) if not isinstance(candidate, int) else str(candidate),
                      "version": None, "path": None, "published": False, "value": None, "evaluation": None},
        "current": {"version": None, "path": None, "value": None, "evaluation": None},
        "delta": None, "chance": None,
        "latency": None, "max_p99_ms": gate.max_p99_ms,
        "shadow": None if gate.shadow is None else {
            "url": gate.shadow.url, "min_agreement": gate.shadow.min_agreement,
            "min_shadow_requests": gate.shadow.min_requests, "max_js": gate.shadow.max_js,
            "figures": None, "passed": None, "reason": ""},
        "signature_check": {"compatible": None, "differences": [],
                            "allowed": gate.allow_signature_change},
        "labels_before": None, "labels_after": None,
        "eval_data": {"path": os.fspath(eval_data), "images": None, "fingerprint": None},
        "started_at": model_repo.timestamp(), "seconds": None,
    }


def _finish(report: dict, decision: str, reason: str, started: float) -> dict:
    report["decision"] = decision
    report["reason"] = reason
    report["exit_code"] = {"promoted": EXIT_PROMOTED, "rejected": EXIT_REJECTED}.get(decision, EXIT_ERROR)
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def error_report(repo: str | os.PathLike, model_name: str, candidate: str | int | os.PathLike,
                 eval_data: str | os.PathLike, label: str, reason: str) -> dict:
    """The "error" report (exit 2) of a promotion refused before it started, e.g. for a gate that cannot be built."""
    report = _new_report(repo, model_name, candidate, eval_data, label, Gate())
    return _finish(report, "error", reason, time.monotonic())


def _judge(report: dict, gate: Gate, candidate_eval, current_eval, label: str) -> tuple[bool, str]:
    """The gate's verdict and its reason, filling the metric fields of ``report``."""
    value = metric_value(candidate_eval, gate.metric)
    report["candidate"]["value"] = value
    report["candidate"]["evaluation"] = _summary(candidate_eval, gate.metric)
    if current_eval is None:
        chance = chance_level(candidate_eval.labels)
        report["chance"] = chance
        if candidate_eval.accuracy <= chance:
            return False, (f"no version under label {label!r}: sanity check failed, accuracy "
                           f"{candidate_eval.accuracy:.4f} does not beat chance {chance:.4f}")
        verdict = (f"no version under label {label!r}: sanity check passed, accuracy "
                   f"{candidate_eval.accuracy:.4f} beats chance {chance:.4f}")
    else:
        current_value = metric_value(current_eval, gate.metric)
        report["current"]["value"] = current_value
        report["current"]["evaluation"] = _summary(current_eval, gate.metric)
        delta = value - current_value
        report["delta"] = delta
        if delta < gate.min_delta:
            return False, (f"{gate.metric} {value:.4f} vs {current_value:.4f}: delta {delta:+.4f} "
                           f"is below the required {gate.min_delta:+.4f}")
        verdict = (f"{gate.metric} {value:.4f} vs {current_value:.4f}: delta {delta:+.4f} "
                   f">= {gate.min_delta:+.4f}")
    latency = report["latency"]
    if gate.max_p99_ms is not None and latency is not None:
        if latency["p99_ms"] > gate.max_p99_ms:
            return False, f"p99 latency {latency['p99_ms']:.2f} ms exceeds {gate.max_p99_ms:g} ms ({verdict})"
        verdict += f"; p99 latency {latency['p99_ms']:.2f} ms <= {gate.max_p99_ms:g} ms"
    return True, verdict


def promote(repo: str | os.PathLike, model_name: str, candidate: str | int | os.PathLike,
            eval_data: str | os.PathLike, *, label: str = "stable", gate: Gate | None = None,
            lock_timeout: float = -1.0, progress: Callable[[str], None] | None = None) -> dict:
    """Gate ``candidate`` against the version under ``label`` and move the label if it passes.

    ``candidate`` is a version number of the model or an export directory (a
    SavedModel in the export contract). Returns the JSON-ready report; its
    ``decision`` is "promoted", "rejected" or "error" and ``exit_code`` 0, 1 or 2.
    Never raises for repository or data problems: they become "error" reports.
    ``lock_timeout`` (seconds, -1 waits forever) bounds the wait for another promotion.
    """
    gate = gate or Gate()
    say = progress or (lambda message: None)
    started = time.monotonic()
    report = _new_report(repo, model_name, candidate, eval_data, label, gate)
    try:
        if not label or "/" in label:
            raise PromotionError(f"invalid label {label!r}")
        try:
            directory = model_repo.model_dir(repo, model_name)
        except ValueError as exc:
            raise PromotionError(str(exc)) from exc
        if not Path(repo).is_dir():
            raise PromotionError(f"repository {os.fspath(repo)} does not exist")
        with model_repo.label_lock(directory, lock_timeout, say):
            _pause("locked")
            return _promote_locked(report, directory, candidate, eval_data, label, gate, say, started)
    except (PromotionError, model_repo.RepositoryError) as exc:
        return _finish(report, "error", str(exc), started)
    except Timeout:
        return _finish(report, "error", f"another promotion holds the lock on {model_name!r} "
                                        f"(waited {lock_timeout:g} s)", started)


def _read_shadow(report: dict, gate: live.ShadowGate, model_name: str, version: int | None,
                 say: Callable[[str], None]) -> None:
    """Read the live comparison into the report before any evaluation, so a server that cannot be read
    is an error at once (exit 2)."""
    if version is None:
        raise PromotionError("--shadow-url needs --candidate to be the version number the server labels "
                             "canary, not an export directory")
    say(f"reading the live comparison at {live.route(gate.url, model_name)}"
        + (f" (waiting up to {gate.wait_s:g} s for {gate.min_requests} compared requests)" if gate.wait_s else ""))
    try:
        report["shadow"]["figures"] = live.read(gate, model_name, version)
    except live.ShadowUnavailable as exc:
        raise PromotionError(str(exc)) from exc


def _promote_locked(report, directory: Path, candidate, eval_data, label: str, gate: Gate,
                    say: Callable[[str], None], started: float) -> dict:
    labels = _read_labels(directory)
    report["labels_before"] = dict(labels)
    model_repo.reconcile(directory, labels)

    version, path = model_repo.resolve_candidate(directory, candidate)
    report["candidate"].update(version=version, path=str(path))
    current = labels.get(label)
    current_path = None
    if current is not None:
        try:
            current_path = model_repo.version_path(directory, current)
        except model_repo.RepositoryError as exc:
            raise PromotionError(f"label {label!r} points to version {current}, which does not exist: "
                                 f"{exc}") from exc
        report["current"].update(version=current, path=str(current_path))

    if gate.shadow is not None:
        _read_shadow(report, gate.shadow, directory.name, version, say)

    images = _load_eval_data(eval_data)
    report["eval_data"].update(images=len(images), fingerprint=images.fingerprint())

    if version is not None and version == current:
        report["labels_after"] = dict(labels)
        return _finish(report, "promoted", f"version {version} is already under label {label!r}; "
                                           "nothing changed", started)

    compatible = True
    if current_path is not None:
        try:
            differences = signature_differences(current_path, path)
        except ValueError as exc:  # a saved_model.pb that is not a SavedModel
            raise PromotionError(str(exc)) from exc
        compatible = not differences
        report["signature_check"].update(compatible=compatible, differences=differences)
    if not compatible and not gate.allow_signature_change:
        # Scored anyway when possible, so the report still shows both metrics.
        with contextlib.suppress(PromotionError):
            _judge(report, gate, _evaluate(path, images, gate, "candidate"),
                   _evaluate(current_path, images, gate, f"current version {current}"), label)
        report["labels_after"] = dict(labels)
        return _finish(report, "rejected", f"signatures differ from version {current} "
                                           f"({'; '.join(report['signature_check']['differences'])}); "
                                           "pass --allow-signature-change to accept", started)

    say(f"evaluating candidate {path} on {len(images)} images ({gate.signature})")
    candidate_eval = _evaluate(path, images, gate, "candidate")
    current_eval = None
    if current_path is not None:
        say(f"evaluating version {current} (label {label!r}) on the same images")
        current_eval = _evaluate(current_path, images, gate, f"current version {current}")
    if gate.max_p99_ms is not None:
        say(f"measuring the candidate's p99 latency ({gate.latency_runs} single-image calls)")
        # Heavy (TensorFlow): the measurement runs the SavedModel.
        from training.evaluate import measure_latency

        try:
            report["latency"] = measure_latency(path, images, signature=gate.signature,
                                                runs=gate.latency_runs)
        except Exception as exc:  # the model evaluated fine, so this is unexpected: report it
            raise PromotionError(f"cannot measure latency of {path}: {type(exc).__name__}: {exc}") from exc
    _pause("evaluated")

    passed, reason = _judge(report, gate, candidate_eval, current_eval, label)
    if passed and gate.shadow is not None:
        passed, live_reason = live.judge(report["shadow"]["figures"], gate.shadow, version, current)
        report["shadow"].update(passed=passed, reason=live_reason)
        reason = f"{reason}; {live_reason}" if passed else f"{live_reason} (held-out: {reason})"
    if not passed:
        report["labels_after"] = dict(labels)
        return _finish(report, "rejected", reason, started)

    if version is None:
        version = model_repo.publish_export(directory, path, on_staged=lambda: _pause("staged"))
        report["candidate"].update(version=version, path=str(directory / str(version)), published=True)
        say(f"published {path} as version {version}")
    _pause("published")
    new_labels = {**labels, label: version}
    model_repo.write_labels(directory, new_labels)
    _pause("labels_written")
    stack = model_repo.label_stack(model_repo.read_history(directory), label)
    model_repo.record_label_move(
        directory, action="promote", label=label, old=current, new=version, stack=stack + [version],
        metric=gate.metric, candidate_value=report["candidate"]["value"],
        current_value=report["current"]["value"],
        source=None if not report["candidate"]["published"] else report["candidate"]["input"])
    report["labels_after"] = dict(new_labels)
    return _finish(report, "promoted", reason, started)


# -- rollback ---------------------------------------------------------------

def rollback(repo: str | os.PathLike, model_name: str, *, label: str = "stable",
             lock_timeout: float = -1.0, progress: Callable[[str], None] | None = None) -> dict:
    """Move ``label`` back to the version it held before its latest promotion.

    Returns {"decision": "rolled_back"|"error", "exit_code", "reason", "from", "to", ...}.
    Successive rollbacks walk further back through the label's history.
    """
    report = {"decision": None, "exit_code": None, "reason": "", "model_name": model_name,
              "repo": os.fspath(repo), "label": label, "from": None, "to": None, "labels_after": None}
    try:
        try:
            directory = model_repo.model_dir(repo, model_name)
        except ValueError as exc:
            raise PromotionError(str(exc)) from exc
        if not directory.is_dir():
            raise PromotionError(f"model directory {directory} does not exist")
        with model_repo.label_lock(directory, lock_timeout, progress or (lambda message: None)):
            labels = _read_labels(directory)
            model_repo.reconcile(directory, labels)
            current = labels.get(label)
            if current is None:
                raise PromotionError(f"label {label!r} is not set for model {model_name!r}")
            stack = model_repo.label_stack(model_repo.read_history(directory), label)
            if len(stack) < 2:
                raise PromotionError(f"label {label!r} has no earlier version in {contract.HISTORY_FILE} "
                                     f"to roll back to (it is on version {current})")
            target = stack[-2]
            try:
                model_repo.version_path(directory, target)
            except model_repo.RepositoryError as exc:
                raise PromotionError(f"cannot roll back label {label!r} to version {target}: {exc}") from exc
            new_labels = {**labels, label: target}
            model_repo.write_labels(directory, new_labels)
            model_repo.record_label_move(directory, action="rollback", label=label, old=current, new=target,
                                         stack=stack[:-1])
            report.update({"from": current, "to": target, "labels_after": new_labels})
            report.update(decision="rolled_back", exit_code=EXIT_PROMOTED,
                          reason=f"label {label!r} moved back from version {current} to {target}")
    except (PromotionError, model_repo.RepositoryError) as exc:
        report.update(decision="error", exit_code=EXIT_ERROR, reason=str(exc))
    except Timeout:
        report.update(decision="error", exit_code=EXIT_ERROR,
                      reason=f"another promotion holds the lock on {model_name!r}")
    return report


def format_report(report: Mapping) -> str:
    """One line for humans: decision, versions and the reason."""
    candidate = report.get("candidate", {})
    who = candidate.get("version") if candidate.get("version") is not None else candidate.get("input")
    return f"{report['decision']}: candidate {who} for label {report['label']!r}: {report['reason']}"
