"""One model's directory on disk: its versions, which are complete, which to serve, labels.

Layout: ``<base_path>/<version>/saved_model.pb`` with integer version names, plus
an optional ``<base_path>/labels.json`` (``{"stable": 3, "canary": 4}``). Hidden
and non-integer entries are ignored (writers stage versions in hidden temp dirs).

Completeness: a version directory is loadable only once two consecutive scans see
the same (relative file list, sizes, mtimes). A new version is therefore seen on
one scan and becomes loadable on the next one that finds it unchanged, so a copy
made by a tool that does not rename atomically is never loaded half-written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from graft import contract
from serving.config import VersionPolicy

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Scan:
    """The result of one scan: complete versions (-> their dirs) and those still settling."""

    versions: Mapping[int, str] = field(default_factory=dict)
    pending: frozenset[int] = frozenset()


def list_version_dirs(base_path: str | os.PathLike) -> dict[int, str]:
    """Integer-named subdirectories of ``base_path`` holding ``saved_model.pb``, by version.

    Raises OSError when ``base_path`` cannot be listed.
    """
    base = os.fspath(base_path)
    entries = list(os.scandir(base))
    found: dict[int, str] = {}
    for entry in sorted(entries, key=lambda e: e.name):
        name = entry.name
        if contract.is_hidden(name) or not contract.is_version_name(name):
            continue
        try:
            if not entry.is_dir() or not os.path.isfile(os.path.join(entry.path, contract.SAVED_MODEL_FILE)):
                continue
        except OSError:
            continue
        version = int(name)
        if version in found:
            log.warning("ignoring %s: version %d already found at %s", entry.path, version, found[version])
            continue
        found[version] = entry.path
    return found


def fingerprint(path: str | os.PathLike) -> Fingerprint:
    """(relative path, size, mtime_ns) of every file under ``path``, sorted."""
    root = os.fspath(path)
    items: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            stat = os.stat(full)
            items.append((os.path.relpath(full, root), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(items))


def select_versions(policy: VersionPolicy, versions: Iterable[int]) -> set[int]:
    """The versions ``policy`` wants served, out of the complete ones available."""
    available = set(versions)
    if policy.kind == "all":
        return available
    if policy.kind == "specific":
        return available & set(policy.versions)
    return set(sorted(available, reverse=True)[: policy.num_versions])


class Repository:
    """Scans one model's base path, remembering fingerprints between scans.

    Not thread-safe: one poller calls :meth:`scan` at a time.
    """

    def __init__(self, base_path: str | os.PathLike):
        self.base_path = os.fspath(base_path)
        self._seen: dict[int, tuple[str, Fingerprint]] = {}
        self._complete: dict[int, str] = {}
        self.problem = ""
        """Why the last scan found no version here ("" once it finds one); readiness reports it."""

    def scan(self) -> Scan:
        """List versions; return those found complete and those still settling.

        A base path that cannot be listed (missing or unreadable) is not an error
        and changes nothing: the versions found before stay complete, as TF Serving
        keeps serving through a failed poll. At start that means no versions, until
        some appear. A base path that is missing, unreadable or holds no version is
        logged at WARNING when that starts or changes, not again at every poll that
        still finds it so, and kept in :attr:`problem`.
        """
        try:
            listed = list_version_dirs(self.base_path)
            problem = "" if listed else (f"model base path {self.base_path} holds no version yet "
                                         "(a version is an integer directory holding saved_model.pb)")
        except OSError as exc:
            reason = "it does not exist" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
            listed, problem = None, f"cannot list model base path {self.base_path}: {reason}"
        if problem != self.problem:
            self._log_change(problem, unlisted=listed is None)
            self.problem = problem
        if listed is None:
            # A transient listing failure must not unload every version of the model.
            return Scan(versions=dict(self._complete), pending=frozenset(self._seen))
        # A version that vanished (or was replaced at another path) starts over.
        for version in list(self._complete):
            if listed.get(version) != self._complete[version]:
                del self._complete[version]
        for version in list(self._seen):
            if version not in listed:
                del self._seen[version]
        pending: set[int] = set()
        for version, path in listed.items():
            if version in self._complete:
                continue
            try:
                current = fingerprint(path)
            except OSError:
                # Files moving under us: certainly not complete.
                self._seen.pop(version, None)
                pending.add(version)
                continue
            previous = self._seen.get(version)
            if previous == (path, current):
                self._complete[version] = path
                del self._seen[version]
            else:
                self._seen[version] = (path, current)
                pending.add(version)
        return Scan(versions=dict(self._complete), pending=frozenset(pending))

    def _log_change(self, problem: str, unlisted: bool) -> None:
        if unlisted:
            # Not fatal: a volume may be mounted later, or the directory is being replaced.
            kept = "keeping its versions" if self._complete else "nothing to serve from it until then"
            log.warning("%s (%s; looking again at every poll)", problem, kept)
        elif problem:
            log.warning("%s; looking again at every poll", problem)
        elif self.problem:
            log.info("model base path %s now holds versions", self.base_path)

    def read_labels(self) -> dict[str, int] | None:
        """``labels.json`` of this model (``graft.contract.read_labels``)."""
        return contract.read_labels(self.base_path)
