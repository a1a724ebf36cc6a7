"""graft-train's checks of every argument and file, before any image is read or any network built.

Nothing here imports TensorFlow, so a wrong flag costs a fraction of a second
instead of the TensorFlow start-up, an image scan and a network build. Each
check reads as little as it can: directory entries for image folders, headers
for weight files, ``saved_model.pb`` for an exported version. Every refusal is
a :class:`~training.errors.UsageError` that names its flag; graft-train prints
it in one line and exits 2.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from graft import contract
from training import catalog, cluster, folders, scenarios, sources
from training import repo as model_repo
from training.errors import UsageError

# Where a fit's report goes without --run-dir (training.pipeline names the run inside it).
DEFAULT_RUNS_DIR = "runs"


class FitSettings(Protocol):
    """What the fit checks read: ``graft-train fit``'s parsed flags or a training.pipeline.FitConfig."""

    data: str | os.PathLike
    val_data: str | os.PathLike | None
    base: str
    weights: str
    scenario: str
    image_size: int | None
    freeze_first: int
    strategy: str
    log_dir: str | os.PathLike | None
    run_dir: str | os.PathLike | None
    repo: str | os.PathLike
    model_name: str


@dataclass(frozen=True)
class CheckedFit:
    """What the fit checks found: the base, the image size it trains at, the located weights, the classes.

    ``weights`` has no sha256 yet (hashing reads the whole file); the pipeline
    digests it once it goes ahead.
    """

    spec: catalog.BaseSpec
    image_size: int
    weights: sources.WeightsSource
    class_names: list[str]


def image_folder(flag: str, path: str | os.PathLike) -> list[str]:
    """The class names of an image folder, read from directory entries only; UsageError naming ``flag``."""
    try:
        return folders.check_layout(path)
    except UsageError as exc:
        raise exc.naming(flag) from None


def writable_dir(flag: str, path: str | os.PathLike) -> None:
    """UsageError naming ``flag`` unless ``path`` is a directory we can write, or one we can create."""
    target = Path(os.path.abspath(os.fspath(path)))
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = "exists and is not a directory" if existing == target else \
            f"cannot be created: {existing} is not a directory"
        raise UsageError(flag, f"{target} {problem}")
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "is not writable" if existing == target else f"cannot be created: {existing} is not writable"
        raise UsageError(flag, f"{target} {verb}")


def _base(settings: FitSettings) -> tuple[catalog.BaseSpec, int]:
    try:
        spec = catalog.get_base(settings.base)
    except ValueError as exc:  # the catalog's own message lists the choices
        raise UsageError("--base", str(exc)) from None
    image_size = settings.image_size or spec.default_size
    if image_size < spec.min_size:
        raise UsageError("--image-size", f"{image_size} is below {spec.name}'s minimum of {spec.min_size}")
    return spec, image_size


def _scenario(settings: FitSettings) -> None:
    try:
        choice = scenarios.parse_scenario(settings.scenario)
    except ValueError as exc:  # parse_scenario's message lists the choices
        raise UsageError("--scenario", str(exc)) from None
    if choice == 4 and settings.freeze_first:
        raise UsageError("--freeze-first", "contradicts --scenario 4 (full), which trains every layer; "
                                           "use --scenario 2 (fine-tune) to keep the first layers frozen")


def check_fit(settings: FitSettings, environ: Mapping[str, str] | None = None) -> CheckedFit:
    """Check every setting of a fit, in the order a user reads the flags; UsageError names the first bad one.

    The data and validation folders (their class folders, each with an image
    file; the same classes in both), base and image size, scenario, weights
    (located and their headers checked), ``TF_CONFIG`` for ``--strategy
    multiworker`` (from ``environ``, default os.environ), the TensorBoard
    package and a writable ``--log-dir``, the repository and model name, and
    the run directory.
    """
    class_names = image_folder("--data", settings.data)
    if settings.val_data:
        val_classes = image_folder("--val-data", settings.val_data)
        if val_classes != class_names:
            raise UsageError("--val-data", f"classes {val_classes} differ from --data classes {class_names}")
    spec, image_size = _base(settings)
    _scenario(settings)
    weights = sources.locate_weights(settings.weights, spec)
    if settings.strategy == "multiworker":
        cluster.read_task(environ)
    if settings.log_dir:
        # tf.summary writes through the tensorboard package; Keras' callback fails late without it.
        if importlib.util.find_spec("tensorboard") is None:
            raise UsageError("--log-dir", "needs the tensorboard package: pip install tensorboard")
        writable_dir("--log-dir", settings.log_dir)
    try:
        model_repo.model_dir(settings.repo, settings.model_name)
    except ValueError as exc:  # model_dir's only check is the name's
        raise UsageError("--model-name", str(exc)) from None
    writable_dir("--repo", settings.repo)
    writable_dir("--run-dir", settings.run_dir or DEFAULT_RUNS_DIR)
    return CheckedFit(spec, image_size, weights, class_names)


def check_evaluate(model: str | os.PathLike, data: str | os.PathLike, signature: str,
                   report_dir: str | os.PathLike | None) -> None:
    """Check ``graft-train evaluate``'s flags: the version, its signature and classes, the data, the report dir.

    Reads ``saved_model.pb``'s signature table and the version's class names
    (graft.contract, no TensorFlow) and the data folder's entries.
    """
    path = Path(model)
    if not (path / contract.SAVED_MODEL_FILE).is_file():
        raise UsageError("--model", f"{path} is not an exported version (no {contract.SAVED_MODEL_FILE})")
    try:
        signatures = contract.read_signature_defs(path)
        model_classes = contract.read_class_names(path)
    except ValueError as exc:  # graft.contract names the unreadable file
        raise UsageError("--model", str(exc)) from None
    if signature not in signatures:
        raise UsageError("--signature", f"{path} has no signature {signature!r} "
                                        f"(it has {', '.join(signatures) or 'none'})")
    class_names = image_folder("--data", data)
    unknown = [name for name in class_names if name not in model_classes]
    if unknown:
        raise UsageError("--data", f"classes not known to the model at {path}: {', '.join(unknown)} "
                                   f"(the model knows {', '.join(model_classes)})")
    if report_dir:
        writable_dir("--report-dir", report_dir)
