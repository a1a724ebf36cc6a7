"""The model repository as training writes it: versions, atomic publish, labels.json and the label history.

The layout and the labels.json rules are graft.contract's. Writers build a
version inside a hidden temporary directory in the model directory (same file
system, so the final ``os.rename`` is atomic) and only then rename it to the next
integer; the server skips hidden and non-integer names, so it never sees a
half-written version. A file lock in the model directory serialises publishers
so that two concurrent exports cannot claim the same number.

Label moves (promote, rollback) hold a second lock, :func:`label_lock`, for
their read-decide-write, and record each move as one line of the label history;
:func:`reconcile` repairs the history when a command died between writing
``labels.json`` and its history line.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

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


# -- versions ---------------------------------------------------------------------------

class RepositoryError(ValueError):
    """The repository lacks what was asked for (a model, a version, a candidate); the message names it."""


def complete_versions(model_directory: str | os.PathLike) -> list[int]:
    """Version numbers whose directory holds a saved_model.pb (what the server can load)."""
    directory = Path(model_directory)
    return [v for v in list_versions(directory)
            if (directory / str(v) / contract.SAVED_MODEL_FILE).is_file()]


def version_path(model_directory: str | os.PathLike, version: int) -> Path:
    """The directory of a complete version; RepositoryError names the versions that exist."""
    directory = Path(model_directory)
    path = directory / str(version)
    if not (path / contract.SAVED_MODEL_FILE).is_file():
        listed = ", ".join(map(str, complete_versions(directory))) or "none"
        raise RepositoryError(f"version {version} of model {directory.name!r} does not exist "
                              f"at {path} (versions present: {listed})")
    return path


def resolve_candidate(model_directory: str | os.PathLike,
                      candidate: str | int | os.PathLike) -> tuple[int | None, Path]:
    """(version, path) for a version number, or (None, path) for an export directory.

    A bare number is a version of the model; anything else is a path. A path to
    one of the model's own version directories counts as that version.
    RepositoryError when it is neither.
    """
    text = os.fspath(candidate) if not isinstance(candidate, int) else str(candidate)
    if contract.is_version_name(text):
        version = int(text)
        return version, version_path(model_directory, version)
    path = Path(text)
    if not path.is_dir():
        raise RepositoryError(f"candidate {text!r} is neither a version number nor a directory")
    if not (path / contract.SAVED_MODEL_FILE).is_file():
        raise RepositoryError(f"candidate directory {path} is not a SavedModel (no {contract.SAVED_MODEL_FILE})")
    resolved = path.resolve()
    if resolved.parent == Path(model_directory).resolve() and contract.is_version_name(resolved.name):
        return int(resolved.name), resolved
    return None, resolved


def publish_export(model_directory: str | os.PathLike, source: str | os.PathLike, *,
                   on_staged: Callable[[], None] | None = None) -> int:
    """Copy an export directory into the model as its next version, atomically; return the number.

    ``on_staged`` runs once the copy is complete and still hidden (the crash
    tests stop the process there).
    """
    directory = Path(model_directory)
    with staging_dir(directory) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if on_staged is not None:
            on_staged()
        version, _ = publish_dir(tmp, directory)
    return version


def describe_model(repo: str | os.PathLike, model_name: str) -> dict:
    """Labels, complete versions, dangling labels and the label history of one model (read only, no lock).

    RepositoryError when the model directory does not exist, ValueError for a malformed labels.json.
    """
    directory = model_dir(repo, model_name)
    if not directory.is_dir():
        raise RepositoryError(f"model directory {directory} does not exist")
    labels = contract.read_labels(directory) or {}
    versions = complete_versions(directory)
    return {"model_name": model_name, "labels": labels, "versions": versions,
            "dangling": {name: v for name, v in labels.items() if v not in versions},
            "history": read_history(directory)}


# -- label moves: lock and history -----------------------------------------------------------

# A label's lineage is kept in each history line; past this it is trimmed.
MAX_STACK = 100


def timestamp() -> str:
    """The current UTC time as history lines and reports write it (ISO 8601, milliseconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@contextlib.contextmanager
def label_lock(model_directory: str | os.PathLike, timeout: float,
               say: Callable[[str], None]) -> Iterator[None]:
    """Hold the model's promotion lock for a read-decide-write of its labels.

    flock: the kernel releases it if the process dies. ``timeout`` seconds
    (-1: forever) bound the wait, then filelock.Timeout; ``say`` hears once
    that another command holds it.
    """
    directory = Path(model_directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / contract.PROMOTE_LOCK_FILE), timeout=timeout)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting for another promotion or rollback of {directory.name!r} (lock {lock.lock_file})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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


def record_label_move(model_directory: str | os.PathLike, *, action: str, label: str,
                      old: int | None, new: int | None, stack: Sequence[int], **details) -> dict:
    """Append the history line of a label move and return it.

    ``stack`` is the label's versions after the move, oldest first (trimmed to
    its last MAX_STACK); ``details`` (the gate's metric, a reason...) go in as they are.
    """
    entry = {"time": timestamp(), "action": action, "label": label, "from": old, "to": new,
             "stack": list(stack)[-MAX_STACK:], **details}
    append_history(model_directory, entry)
    return entry


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
        appended.append(record_label_move(
            model_directory, action="recovered", label=label, old=top, new=current, stack=repaired,
            reason="labels.json and the history disagreed (interrupted command or manual edit)"))
    return appended
