"""Promotion: gate a candidate version against the labelled one, then move the label.

``promote`` evaluates the candidate and the version a label points at on the
same held-out images through the exported SavedModel signature the server runs
(training.evaluate), checks that the candidate's signatures and classes match
the current version's, optionally measures its p99 latency in-process, and then:

- promoted (exit 0): an export directory is first published as the next version
  (hidden staging copy + rename, training.repo), ``labels.json`` is replaced
  atomically, and a line is appended to ``labels.history.jsonl``;
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
import datetime as _dt
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tensorboard.compat.proto import types_pb2

from graft import contract
from training import repo as model_repo

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
# A label's lineage is kept in each history line; past this it is trimmed.
MAX_STACK = 100


class PromotionError(Exception):
    """A problem that prevents any decision (exit 2): the message names it."""


@dataclasses.dataclass(frozen=True)
class Gate:
    """What a candidate must satisfy to be promoted.

    ``min_delta``: candidate metric minus current metric must be at least this.
    ``max_p99_ms``: when set, the candidate's single-image p99 latency limit.
    ``signature``: the exported entry point used for evaluation and latency.
    """

    metric: str = "accuracy"
    min_delta: float = 0.0
    max_p99_ms: float | None = None
    allow_signature_change: bool = False
    signature: str = "serving_default"
    latency_runs: int = 100
    batch_size: int = 32

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.signature not in EVAL_SIGNATURES:
            raise ValueError(f"unknown signature {self.signature!r}; choose one of {', '.join(EVAL_SIGNATURES)}")
        if self.max_p99_ms is not None and not self.max_p99_ms > 0:
            raise ValueError(f"max_p99_ms must be positive, got {self.max_p99_ms}")
        if self.latency_runs < 10:
            raise ValueError(f"latency_runs must be at least 10, got {self.latency_runs}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


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


# -- signatures -----------------------------------------------------------------

def dtype_name(enum: int) -> str:
    """TensorFlow's name for a DataType enum ("float32", "int64", "string"), without TensorFlow."""
    try:
        name = types_pb2.DataType.Name(enum)
    except ValueError:
        return f"dtype {enum}"
    base = name.removeprefix("DT_").lower()
    ref = base.endswith("_ref")
    base = base.removesuffix("_ref")
    # The proto's names for these three predate TensorFlow's width-suffixed ones.
    base = {"float": "float32", "double": "float64", "half": "float16"}.get(base, base)
    return base + ("_ref" if ref else "")


def read_signatures(path: str | os.PathLike) -> dict[str, dict]:
    """Signature name -> {"method", "inputs", "outputs"} of a version's ``serve`` graph (no TF load).

    Each input/output maps alias -> (dtype name, shape) with None for unknown
    dimensions and a None shape for unknown rank. ValueError when ``path``
    holds no readable SavedModel.
    """
    def tensors(infos) -> dict[str, tuple]:
        found = {}
        for alias, info in sorted(infos.items()):
            shape = None if info.tensor_shape.unknown_rank else tuple(
                dim.size if dim.size >= 0 else None for dim in info.tensor_shape.dim)
            found[alias] = (dtype_name(info.dtype), shape)
        return found

    return {name: {"method": sig.method_name, "inputs": tensors(sig.inputs), "outputs": tensors(sig.outputs)}
            for name, sig in contract.read_signature_defs(path).items()}


def signature_differences(current: str | os.PathLike, candidate: str | os.PathLike) -> list[str]:
    """Why ``candidate`` cannot replace ``current`` for existing clients (empty when it can).

    Every signature of the current version must exist in the candidate with the
    same method, input and output names, dtypes and shapes; the class lists
    (assets/labels.txt) must be equal. Extra candidate signatures are fine.
    """
    differences = []
    old, new = read_signatures(current), read_signatures(candidate)
    for name, spec in old.items():
        if name not in new:
            differences.append(f"signature {name!r} is missing")
            continue
        other = new[name]
        if spec["method"] != other["method"]:
            differences.append(f"signature {name!r}: method {other['method']!r} instead of {spec['method']!r}")
        for side in ("inputs", "outputs"):
            mine, theirs = spec[side], other[side]
            if set(mine) != set(theirs):
                differences.append(f"signature {name!r}: {side} {sorted(theirs)} instead of {sorted(mine)}")
                continue
            for alias, (dtype, shape) in mine.items():
                if theirs[alias][0] != dtype:
                    differences.append(f"signature {name!r}: {side[:-1]} {alias!r} dtype "
                                       f"{theirs[alias][0]} instead of {dtype}")
                if theirs[alias][1] != shape:
                    differences.append(f"signature {name!r}: {side[:-1]} {alias!r} shape "
                                       f"{_shape_text(theirs[alias][1])} instead of {_shape_text(shape)}")
    try:
        old_classes, new_classes = contract.read_class_names(current), contract.read_class_names(candidate)
    except ValueError as exc:
        differences.append(str(exc))
    else:
        if old_classes != new_classes:
            differences.append(f"class list {new_classes} instead of {old_classes}")
    return differences


def _shape_text(shape) -> str:
    if shape is None:
        return "<unknown rank>"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


# -- latency --------------------------------------------------------------------

def measure_latency(path: str | os.PathLike, images, *, signature: str = "serving_default",
                    runs: int = 100, warmup: int = 5) -> dict[str, float]:
    """Single-image latency of a SavedModel signature, in process: p50, p99, mean (ms).

    ``images`` is a training.data.ImageSet; up to 16 of its images are cycled.
    The first ``warmup`` calls (tracing, allocation) are not counted.
    """
    import tensorflow as tf

    from training.data import load_arrays
    from training.evaluate import _example

    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures[signature]
    files = list(images.files[:16])
    if signature == "serving_default":
        spec = fn.structured_input_signature[1]["images"]
        subset = dataclasses.replace(images, files=files, labels=list(images.labels[:16]), skipped=[])
        pixels, _ = load_arrays(subset, (int(spec.shape[1]), int(spec.shape[2])))
        requests = [{"images": tf.constant(pixels[i:i + 1])} for i in range(len(pixels))]
    elif signature == "predict_images":
        requests = [{"image_bytes": tf.constant([Path(f).read_bytes()])} for f in files]
    else:
        requests = [{"inputs": tf.constant([_example(Path(f).read_bytes())])} for f in files]
    timings = []
    for index in range(warmup + runs):
        started = time.perf_counter()
        outputs = fn(**requests[index % len(requests)])
        # Force the result to the host: the server encodes it, so it is part of the cost.
        for value in outputs.values():
            value.numpy()
        if index >= warmup:
            timings.append((time.perf_counter() - started) * 1000.0)
    return {
        "runs": runs,
        "p50_ms": float(np.percentile(timings, 50)),
        "p99_ms": float(np.percentile(timings, 99)),
        "mean_ms": float(np.mean(timings)),
    }


# -- history ----------------------------------------------------------------------

def read_history(model_directory: str | os.PathLike) -> list[dict]:
    """The history entries, oldest first; lines that are not JSON objects are skipped.

    A SIGKILL can at worst leave a torn last line; skipping it loses nothing
    the next command's reconciliation does not restore.
    """
    path = contract.history_path(model_directory)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("label"), str):
            entries.append(entry)
    return entries


def append_history(model_directory: str | os.PathLike, entry: Mapping) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor, then fsync."""
    path = contract.history_path(model_directory)
    line = json.dumps(dict(entry), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            # A torn last line (killed writer) must not swallow this entry.
            with open(path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def label_stack(history: Sequence[Mapping], label: str) -> list[int]:
    """The versions ``label`` has held, oldest first, as its latest history line records them."""
    for entry in reversed(history):
        if entry.get("label") == label:
            stack = entry.get("stack")
            if isinstance(stack, list) and all(isinstance(v, int) for v in stack):
                return list(stack)
    return []


def _trimmed(stack: list[int]) -> list[int]:
    return stack[-MAX_STACK:]


def reconcile(model_directory: str | os.PathLike, labels: Mapping[str, int]) -> list[dict]:
    """Make each label's history agree with ``labels.json``, appending ``recovered`` lines.

    A mismatch means a command died between writing ``labels.json`` and the
    history, or someone edited ``labels.json`` by hand. If the current version
    is in the recorded stack, the stack is cut back to it (an unfinished
    rollback, or a hand rollback); otherwise it is pushed (an unfinished promotion).
    Returns the lines appended.
    """
    history = read_history(model_directory)
    names = set(labels) | {entry["label"] for entry in history}
    appended = []
    for label in sorted(names):
        stack = label_stack(history, label)
        current = labels.get(label)
        top = stack[-1] if stack else None
        if current == top:
            continue
        if current is None:
            repaired: list[int] = []
        elif current in stack:
            repaired = stack[:len(stack) - stack[::-1].index(current)]
        else:
            repaired = stack + [current]
        entry = {"time": _now(), "action": "recovered", "label": label, "from": top, "to": current,
                 "stack": _trimmed(repaired),
                 "reason": "labels.json and the history disagreed (interrupted command or manual edit)"}
        append_history(model_directory, entry)
        appended.append(entry)
    return appended


# -- repository access -------------------------------------------------------------

@contextlib.contextmanager
def _locked(model_directory: Path, timeout: float, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the model's promotion lock (flock: released by the kernel if the process dies)."""
    model_directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(model_directory / contract.PROMOTE_LOCK_FILE), timeout=timeout)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting for another promotion or rollback of {model_directory.name!r} "
            f"(lock {lock.lock_file})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _read_labels(model_directory: Path) -> dict[str, int]:
    try:
        return contract.read_labels(model_directory) or {}
    except ValueError as exc:
        raise PromotionError(f"unreadable labels: {exc}") from exc


def complete_versions(model_directory: Path) -> list[int]:
    """Version numbers whose directory holds a saved_model.pb (what the server can load)."""
    return [v for v in model_repo.list_versions(model_directory)
            if (model_directory / str(v) / "saved_model.pb").is_file()]


def version_path(model_directory: Path, version: int) -> Path:
    """The directory of a complete version, or PromotionError naming what exists."""
    path = model_directory / str(version)
    if not (path / "saved_model.pb").is_file():
        listed = ", ".join(map(str, complete_versions(model_directory))) or "none"
        raise PromotionError(f"version {version} of model {model_directory.name!r} does not exist "
                             f"at {path} (versions present: {listed})")
    return path


def resolve_candidate(model_directory: Path, candidate: str | int | os.PathLike) -> tuple[int | None, Path]:
    """(version, path) for a version number, or (None, path) for an export directory.

    A bare number is a version of the model; anything else is a path. A path to
    one of the model's own version directories counts as that version.
    """
    text = os.fspath(candidate) if not isinstance(candidate, int) else str(candidate)
    if text.isascii() and text.isdigit():
        version = int(text)
        return version, version_path(model_directory, version)
    path = Path(text)
    if not path.is_dir():
        raise PromotionError(f"candidate {text!r} is neither a version number nor a directory")
    if not (path / "saved_model.pb").is_file():
        raise PromotionError(f"candidate directory {path} is not a SavedModel (no saved_model.pb)")
    resolved = path.resolve()
    if resolved.parent == model_directory.resolve() and resolved.name.isascii() and resolved.name.isdigit():
        return int(resolved.name), resolved
    return None, resolved


def publish_export(model_directory: Path, source: Path) -> int:
    """Copy an export directory into the model as its next version, atomically; return the number."""
    with model_repo.staging_dir(model_directory) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        _pause("staged")
        version, _ = model_repo.publish_dir(tmp, model_directory)
    return version


def _load_eval_data(eval_data: str | os.PathLike):
    from training.data import scan_image_folder

    try:
        images = scan_image_folder(eval_data)
    except (ValueError, OSError) as exc:
        raise PromotionError(f"unreadable eval data {os.fspath(eval_data)}: {exc}") from exc
    return images


def _evaluate(path: Path, images, gate: Gate, who: str):
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
        "signature_check": {"compatible": None, "differences": [],
                            "allowed": gate.allow_signature_change},
        "labels_before": None, "labels_after": None,
        "eval_data": {"path": os.fspath(eval_data), "images": None, "fingerprint": None},
        "started_at": _now(), "seconds": None,
    }


def _finish(report: dict, decision: str, reason: str, started: float) -> dict:
    report["decision"] = decision
    report["reason"] = reason
    report["exit_code"] = {"promoted": EXIT_PROMOTED, "rejected": EXIT_REJECTED}.get(decision, EXIT_ERROR)
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


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
        with _locked(directory, lock_timeout, say):
            _pause("locked")
            return _promote_locked(report, directory, candidate, eval_data, label, gate, say, started)
    except PromotionError as exc:
        return _finish(report, "error", str(exc), started)
    except Timeout:
        return _finish(report, "error", f"another promotion holds the lock on {model_name!r} "
                                        f"(waited {lock_timeout:g} s)", started)


def _promote_locked(report, directory: Path, candidate, eval_data, label: str, gate: Gate,
                    say: Callable[[str], None], started: float) -> dict:
    labels = _read_labels(directory)
    report["labels_before"] = dict(labels)
    reconcile(directory, labels)

    version, path = resolve_candidate(directory, candidate)
    report["candidate"].update(version=version, path=str(path))
    current = labels.get(label)
    current_path = None
    if current is not None:
        try:
            current_path = version_path(directory, current)
        except PromotionError as exc:
            raise PromotionError(f"label {label!r} points to version {current}, which does not exist: "
                                 f"{exc}") from exc
        report["current"].update(version=current, path=str(current_path))

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
        try:
            report["latency"] = measure_latency(path, images, signature=gate.signature,
                                                runs=gate.latency_runs)
        except Exception as exc:  # the model evaluated fine, so this is unexpected: report it
            raise PromotionError(f"cannot measure latency of {path}: {type(exc).__name__}: {exc}") from exc
    _pause("evaluated")

    passed, reason = _judge(report, gate, candidate_eval, current_eval, label)
    if not passed:
        report["labels_after"] = dict(labels)
        return _finish(report, "rejected", reason, started)

    if version is None:
        version = publish_export(directory, path)
        report["candidate"].update(version=version, path=str(directory / str(version)), published=True)
        say(f"published {path} as version {version}")
    _pause("published")
    new_labels = {**labels, label: version}
    model_repo.write_labels(directory, new_labels)
    _pause("labels_written")
    stack = label_stack(read_history(directory), label)
    append_history(directory, {
        "time": _now(), "action": "promote", "label": label, "from": current, "to": version,
        "stack": _trimmed(stack + [version]), "metric": gate.metric,
        "candidate_value": report["candidate"]["value"], "current_value": report["current"]["value"],
        "source": None if not report["candidate"]["published"] else report["candidate"]["input"],
    })
    report["labels_after"] = dict(new_labels)
    return _finish(report, "promoted", reason, started)


# -- rollback and listing ---------------------------------------------------------------

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
        with _locked(directory, lock_timeout, progress or (lambda message: None)):
            labels = _read_labels(directory)
            reconcile(directory, labels)
            current = labels.get(label)
            if current is None:
                raise PromotionError(f"label {label!r} is not set for model {model_name!r}")
            stack = label_stack(read_history(directory), label)
            if len(stack) < 2:
                raise PromotionError(f"label {label!r} has no earlier version in {contract.HISTORY_FILE} "
                                     f"to roll back to (it is on version {current})")
            target = stack[-2]
            try:
                version_path(directory, target)
            except PromotionError as exc:
                raise PromotionError(f"cannot roll back label {label!r} to version {target}: {exc}") from exc
            new_labels = {**labels, label: target}
            model_repo.write_labels(directory, new_labels)
            append_history(directory, {"time": _now(), "action": "rollback", "label": label,
                                       "from": current, "to": target, "stack": stack[:-1]})
            report.update({"from": current, "to": target, "labels_after": new_labels})
            report.update(decision="rolled_back", exit_code=EXIT_PROMOTED,
                          reason=f"label {label!r} moved back from version {current} to {target}")
    except PromotionError as exc:
        report.update(decision="error", exit_code=EXIT_ERROR, reason=str(exc))
    except Timeout:
        report.update(decision="error", exit_code=EXIT_ERROR,
                      reason=f"another promotion holds the lock on {model_name!r}")
    return report


def show_labels(repo: str | os.PathLike, model_name: str) -> dict:
    """Labels, versions present and the history of one model (read only, no lock)."""
    directory = model_repo.model_dir(repo, model_name)
    if not directory.is_dir():
        raise PromotionError(f"model directory {directory} does not exist")
    labels = _read_labels(directory)
    versions = complete_versions(directory)
    return {"model_name": model_name, "labels": labels, "versions": versions,
            "dangling": {name: v for name, v in labels.items() if v not in versions},
            "history": read_history(directory)}


def format_labels(listing: Mapping) -> str:
    """Plain text for ``graft-train labels``: labels, versions, then the history lines."""
    lines = [f"model {listing['model_name']}: versions {', '.join(map(str, listing['versions'])) or 'none'}"]
    if listing["labels"]:
        for name, version in sorted(listing["labels"].items()):
            note = "  (version missing!)" if name in listing["dangling"] else ""
            lines.append(f"  {name:<10} -> {version}{note}")
    else:
        lines.append("  no labels")
    lines.append(f"history ({len(listing['history'])} entries):")
    for entry in listing["history"]:
        lines.append(f"  {entry.get('time', '?')}  {entry.get('action', '?'):<9} {entry['label']:<10} "
                     f"{entry.get('from')} -> {entry.get('to')}")
    return "\n".join(lines)


def format_report(report: Mapping) -> str:
    """One line for humans: decision, versions and the reason."""
    candidate = report.get("candidate", {})
    who = candidate.get("version") if candidate.get("version") is not None else candidate.get("input")
    return f"{report['decision']}: candidate {who} for label {report['label']!r}: {report['reason']}"


# -- command line (registered in training.cli) ----------------------------------------

def _write_report(path: str | None, data: Mapping) -> str | None:
    """Write the JSON report to ``path``; returns an error message instead of raising."""
    if not path:
        return None
    try:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        return f"cannot write the report to {path}: {exc}"
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _finish_command(result: dict, report_file: str | None) -> int:
    problem = _write_report(report_file, result)
    print(json.dumps(result, indent=2, sort_keys=True), flush=True)
    _stderr(format_report(result) if "candidate" in result else f"{result['decision']}: {result['reason']}")
    if problem:
        _stderr(problem)
        return EXIT_ERROR
    return int(result["exit_code"])


def add_promote_arguments(parser) -> None:
    """Flags of ``graft-train promote``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--candidate", required=True, metavar="VERSION|EXPORT_DIR",
                        help="a version number of the model, or an exported SavedModel directory "
                             "(published as the next version when promoted)")
    parser.add_argument("--eval-data", required=True, metavar="DIR",
                        help="held-out class-per-folder images both versions are scored on")
    parser.add_argument("--label", default="stable", help="the label to move (default stable; e.g. canary)")
    parser.add_argument("--metric", choices=METRICS, default="accuracy", help="gate metric (default accuracy)")
    parser.add_argument("--min-delta", type=float, default=0.0, metavar="D",
                        help="candidate minus current metric must be >= D (default 0.0; negative tolerates a loss)")
    parser.add_argument("--max-p99-ms", type=float, default=None, metavar="MS",
                        help="reject when the candidate's in-process single-image p99 latency exceeds MS")
    parser.add_argument("--allow-signature-change", action="store_true",
                        help="accept a candidate whose signatures or classes differ from the current version")
    parser.add_argument("--signature", choices=EVAL_SIGNATURES, default="serving_default",
                        help="exported signature used for evaluation and latency (default serving_default)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N")
    parser.add_argument("--latency-runs", type=int, default=100, metavar="N",
                        help="timed single-image calls for --max-p99-ms (default 100)")
    parser.add_argument("--lock-timeout", type=float, default=-1.0, metavar="S",
                        help="seconds to wait for a concurrent promotion (default: wait)")
    parser.add_argument("--report", metavar="FILE", help="also write the JSON report here")


def run_promote(args) -> int:
    """``graft-train promote``: exit 0 promoted, 1 rejected, 2 error; the JSON report on stdout."""
    try:
        gate = Gate(metric=args.metric, min_delta=args.min_delta, max_p99_ms=args.max_p99_ms,
                    allow_signature_change=args.allow_signature_change, signature=args.signature,
                    latency_runs=args.latency_runs, batch_size=args.batch_size)
    except ValueError as exc:
        report = _new_report(args.repo, args.model_name, args.candidate, args.eval_data, args.label, Gate())
        return _finish_command(_finish(report, "error", str(exc), time.monotonic()), args.report)
    result = promote(args.repo, args.model_name, args.candidate, args.eval_data, label=args.label,
                     gate=gate, lock_timeout=args.lock_timeout, progress=_stderr)
    return _finish_command(result, args.report)


def add_rollback_arguments(parser) -> None:
    """Flags of ``graft-train rollback``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--label", default="stable", help="the label to move back (default stable)")
    parser.add_argument("--lock-timeout", type=float, default=-1.0, metavar="S",
                        help="seconds to wait for a concurrent promotion (default: wait)")
    parser.add_argument("--report", metavar="FILE", help="also write the JSON result here")


def run_rollback(args) -> int:
    """``graft-train rollback``: exit 0 when the label moved back, 2 otherwise."""
    result = rollback(args.repo, args.model_name, label=args.label, lock_timeout=args.lock_timeout,
                      progress=_stderr)
    return _finish_command(result, args.report)


def add_labels_arguments(parser) -> None:
    """Flags of ``graft-train labels``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_labels(args) -> int:
    """``graft-train labels``: the labels, the versions present and the history."""
    try:
        listing = show_labels(args.repo, args.model_name)
    except (PromotionError, ValueError) as exc:
        _stderr(f"graft-train labels: error: {exc}")
        return EXIT_ERROR
    print(json.dumps(listing, indent=2, sort_keys=True) if args.json else format_labels(listing), flush=True)
    return 0
