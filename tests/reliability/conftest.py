"""Fixtures for the reliability tests: a file-system access recorder and shared helpers.

``fs_audit`` uses Python's audit hooks (PEP 578): every ``open``, ``os.listdir`` and
``os.scandir`` in the process, from any thread, is reported to the hook, so a test
can assert that a request never touched a directory. Audit hooks cannot be removed,
so one hook is installed for the session and records only inside ``watch``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# The audit events through which Python code reads or changes the file system.
FS_EVENTS = frozenset({
    "open", "os.listdir", "os.scandir", "os.chdir", "os.mkdir", "os.remove", "os.rename",
    "os.rmdir", "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.copyfile",
    "shutil.copytree", "shutil.rmtree", "glob.glob",
})


class FsAudit:
    """Records file-system audit events whose path arguments lie under watched roots."""

    def __init__(self):
        self._lock = threading.Lock()
        self._roots: list[str] = []
        self._events: list[tuple[str, str]] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event not in FS_EVENTS or not self._roots:
            return
        for arg in args:
            if isinstance(arg, str | bytes | os.PathLike):
                path = os.fsdecode(os.fspath(arg))
                if any(path.startswith(root) for root in self._roots):
                    with self._lock:
                        self._events.append((event, path))

    @contextmanager
    def watch(self, root: str | os.PathLike) -> Iterator[list[tuple[str, str]]]:
        """Collect ``(event, path)`` for accesses under ``root`` until the block ends."""
        root = os.path.abspath(os.fspath(root))
        seen: list[tuple[str, str]] = []
        with self._lock:
            self._roots.append(root)
            start = len(self._events)
        try:
            yield seen
        finally:
            with self._lock:
                self._roots.remove(root)
                seen.extend(e for e in self._events[start:] if e[1].startswith(root))
                if not self._roots:
                    self._events.clear()


@pytest.fixture(scope="session")
def fs_audit() -> FsAudit:
    """The session's file-system access recorder (see the module docstring)."""
    return FsAudit()

