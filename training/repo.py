"""Model-repository helpers: version numbering, atomic publish, and labels.json.

The layout and the labels.json rules are graft.contract's. Writers build a
version inside a hidden temporary directory in the model directory (same file
system, so the final ``os.rename`` is atomic) and only then rename it to the next
integer; the server skips hidden and non-integer names, so it never sees a
half-written version. A file lock in the model directory serialises publishers
so that two concurrent exports cannot claim the same number.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from filelock import FileLock

from graft import contract


def model_dir(repo: str | os.PathLike, model_name: str) -> Path:
    """Return ``<repo>/<model_name>`` after checking the name is one safe path component."""
    if not model_name or model_name in (".", "..") or "/" in model_name or "\\" in model_name:
        raise ValueError(f"invalid model name {model_name!r}: it must be one path component")
    if model_name.startswith("."):
        raise ValueError(f"invalid model name {model_name!r}: hidden names are ignored by the server")
    return Path(repo) / model_name


def list_versions(directory: str | os.PathLike) -> list[int]:
    """Sorted integer version numbers present in a model directory (empty if it is absent)."""
    path = Path(directory)
    if not path.is_dir():
        return []
    versions = set()
    for entry in path.iterdir():
        # The server reads "007" as version 7, so it must count here too; any directory
        # counts, complete or not, so that a number is never handed out twice.
        if entry.is_dir() and contract.is_version_name(entry.name):
            versions.add(int(entry.name))
    return sorted(versions)


def next_version(directory: str | os.PathLike) -> int:
    """The version number the next publish will get: one more than the largest, or 1."""
    versions = list_versions(directory)
    return versions[-1] + 1 if versions else 1


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Flush the files before the rename publishes them: after a crash, a visible
    # version must not have empty or truncated files.
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _umask_mode(base: int) -> int:
    current = os.umask(0)
    os.umask(current)
    return base & ~current


@contextlib.contextmanager
def staging_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden temporary directory inside ``directory``; remove it on error.

    The caller fills it and passes it to :func:`publish_dir` before the block ends.
    Whatever is still there when the block exits (an error, or nothing published)
    is deleted, so failed exports leave no debris visible to anyone.
    """
    parent = Path(directory)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=contract.TEMP_PREFIX, dir=parent))
    # mkdtemp makes 0700; a server running as another user must be able to read it.
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: str | os.PathLike, directory: str | os.PathLike,
                version: int | None = None) -> tuple[int, Path]:
    """Atomically rename a complete staging directory to ``<directory>/<version>``.

    With ``version`` None the next free number is taken under the publish lock.
    Returns ``(version, path)``. Raises ``FileExistsError`` if an explicit
    version already exists, and ``ValueError`` if ``tmp`` is not inside ``directory``
    (a cross-file-system rename would not be atomic).
    """
    tmp = Path(tmp)
    parent = Path(directory)
    if tmp.resolve().parent != parent.resolve():
        raise ValueError(f"staging directory {tmp} is not directly inside {parent}")
    _fsync_tree(tmp)
    with FileLock(str(parent / contract.PUBLISH_LOCK_FILE)):
        number = next_version(parent) if version is None else int(version)
        if number < 0:
            raise ValueError(f"version must be an integer >= 0, got {number}")
        target = parent / str(number)
        # os.rename would silently replace an existing *empty* directory on POSIX.
        if target.exists():
            raise FileExistsError(f"version {number} already exists at {target}")
        os.rename(tmp, target)
    _fsync_dir(parent)
    return number, target


def write_labels(directory: str | os.PathLike, labels: Mapping[str, int]) -> Path:
    """Atomically replace ``<directory>/labels.json`` (temp file, fsync, ``os.replace``).

    The labels must follow graft.contract's rules; ValueError names the first bad entry.
    """
    parent = Path(directory)
    parent.mkdir(parents=True, exist_ok=True)
    data = contract.check_labels(labels)
    fd, tmp_name = tempfile.mkstemp(prefix=contract.TEMP_PREFIX, suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _umask_mode(0o666))
        target = contract.labels_path(parent)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(parent)
    return target
