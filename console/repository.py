"""The model repository, read only and through names it lists itself.

A model name or version number from a URL is looked up in the listing of the
repository (or of the model) and only a listed entry becomes a path, so nothing
a client sends reaches the file system unchecked: ``..``, absolute paths, hidden
names and links that lead out of the repository are simply not in the listing.
Reading is graft.contract's (labels, lineage, class names, signatures) and
training.repo's (versions, history); nothing here writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graft import contract
from training import repo as model_repo
from training.report import CONFUSION_PNG, CURVES_FILE, REPORT_FILE
from training.signatures import read_signatures

# The report images a version may carry, the only names the console serves.
REPORT_IMAGES = (CURVES_FILE, CONFUSION_PNG)


class NotListed(LookupError):
    """A model, version or file that the repository does not list (the page answers 404)."""


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (links followed) to ``root`` or below it."""
    try:
        return path.resolve(strict=True).is_relative_to(root.resolve(strict=True))
    except OSError:
        return False


class Repository:
    """Read access to ``<repo>/<model>/<version>`` for pages."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def model_names(self) -> list[str]:
        """Model directories: visible names, one path component, resolving inside the repository."""
        try:
            entries = sorted(self.root.iterdir())
        except OSError:
            return []
        names = []
        for entry in entries:
            try:
                model_repo.model_dir(self.root, entry.name)
            except ValueError:
                continue
            if entry.is_dir() and _inside(entry, self.root):
                names.append(entry.name)
        return names

    def model_dir(self, name: str) -> Path:
        """The directory of a listed model; NotListed otherwise."""
        if name not in self.model_names():
            raise NotListed(f"no model {name!r} in the repository")
        return self.root / name

    def versions(self, name: str) -> list[int]:
        """Complete versions (with a saved_model.pb) of a listed model, resolving inside its directory."""
        directory = self.model_dir(name)
        return [v for v in model_repo.complete_versions(directory) if _inside(directory / str(v), directory)]

    def version_dir(self, name: str, version: str | int) -> Path:
        """The directory of a listed version; ``version`` must be its decimal name. NotListed otherwise."""
        text = str(version)
        if not contract.is_version_name(text) or int(text) not in self.versions(name):
            raise NotListed(f"no version {text!r} of model {name!r}")
        return self.model_dir(name) / str(int(text))

    def labels(self, name: str) -> tuple[dict[str, int], str]:
        """(labels, problem): a malformed labels.json gives no labels and says why."""
        try:
            return contract.read_labels(self.model_dir(name)) or {}, ""
        except ValueError as exc:
            return {}, str(exc)

    def history(self, name: str) -> list[dict]:
        """The label history, oldest first (training.repo's reader)."""
        return model_repo.read_history(self.model_dir(name))

    def lineage(self, name: str, version: str | int) -> tuple[dict | None, str]:
        """(lineage, problem) of a version: a missing file is (None, ""), a broken one (None, why)."""
        try:
            return contract.read_lineage(self.version_dir(name, version)), ""
        except ValueError as exc:
            return None, str(exc)

    def signatures(self, name: str, version: str | int) -> tuple[dict, str]:
        """(signature name -> {method, inputs, outputs}, problem) read from saved_model.pb."""
        try:
            return read_signatures(self.version_dir(name, version)), ""
        except ValueError as exc:
            return {}, str(exc)

    def class_names(self, name: str, version: str | int) -> list[str]:
        """The class names of a version, empty when it has none."""
        try:
            return contract.read_class_names(self.version_dir(name, version))
        except ValueError:
            return []

    def report(self, name: str, version: str | int) -> tuple[dict | None, list[str]]:
        """(report.json, the report images present) of the run that trained the version."""
        directory = contract.report_path(self.version_dir(name, version))
        images = [image for image in REPORT_IMAGES if self._report_file(directory, image) is not None]
        path = self._report_file(directory, REPORT_FILE)
        data = None
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
        return (data if isinstance(data, dict) else None), images

    def report_image(self, name: str, version: str | int, image: str) -> Path:
        """The path of one report image of a listed version; NotListed for any other name."""
        if image not in REPORT_IMAGES:
            raise NotListed(f"no report image {image!r}")
        path = self._report_file(contract.report_path(self.version_dir(name, version)), image)
        if path is None:
            raise NotListed(f"version {version} of {name!r} carries no {image}")
        return path

    @staticmethod
    def _report_file(directory: Path, file: str) -> Path | None:
        path = directory / file
        return path if path.is_file() and _inside(path, directory) else None


def promote_reports(report_dir: str | os.PathLike | None, model_name: str) -> list[dict]:
    """``graft-train promote --report`` files in ``report_dir`` about ``model_name``, newest first.

    Files that are not JSON promote reports are skipped: the folder may hold anything.
    """
    if report_dir is None:
        return []
    found = []
    try:
        paths = sorted(Path(report_dir).glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(data, dict) and data.get("model_name") == model_name
                and isinstance(data.get("candidate"), dict) and "decision" in data):
            found.append({**data, "file": path.name})
    return sorted(found, key=lambda report: str(report.get("started_at", "")), reverse=True)


def evaluations_of(reports: list[dict], version: int) -> list[dict]:
    """The held-out evaluations of ``version`` in promote reports: as candidate or as the current version."""
    rows = []
    for report in reports:
        for role in ("candidate", "current"):
            side = report.get(role)
            if isinstance(side, Mapping) and side.get("version") == version and side.get("evaluation"):
                rows.append({"role": role, "report": report, "evaluation": side["evaluation"],
                             "value": side.get("value")})
    return rows


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """A nested JSON value as dotted key -> leaf value (lists of scalars stay whole), for diffs."""
    if isinstance(record, Mapping):
        flat: dict[str, Any] = {}
        for key, value in record.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat or ({prefix: {}} if prefix else {})
    if isinstance(record, list) and any(isinstance(item, (Mapping, list)) for item in record):
        flat = {}
        for index, value in enumerate(record):
            flat.update(flatten(value, f"{prefix}[{index}]"))
        return flat
    return {prefix: record}


def diff(left: Mapping | None, right: Mapping | None) -> list[dict]:
    """Rows {key, left, right, same} over the union of two records' flattened keys, in key order."""
    a, b = flatten(left or {}), flatten(right or {})
    missing = object()
    rows = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        rows.append({"key": key, "left": None if x is missing else x, "right": None if y is missing else y,
                     "same": x == y})
    return rows
