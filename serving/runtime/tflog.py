"""TensorFlow's own log lines (C++ and absl, written straight to file descriptor 2): quiet by default.

TensorFlow logs outside Python's logging. Importing it and finding the devices
on a CPU-only machine printed, with TensorFlow 2.21, whatever
``TF_CPP_MIN_LOG_LEVEL`` said: absl's "All log messages before
absl::InitializeLog() is called are written to STDERR" banner, INFO lines about
oneDNN and missing CUDA drivers (each twice), and an ERROR line, "failed call to
cuInit", although nothing is wrong there. ``TF_CPP_MIN_LOG_LEVEL`` governs only
the lines written after absl is set up, and its level 3, the only one that hides
the cuInit line, hides every real TensorFlow error as well.

So graft-serve, unless the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves:

- sets it to 2 (TensorFlow's own errors only) before TensorFlow is imported;
- while it imports TensorFlow and starts the server (device discovery
  included), passes file descriptor 2 through :func:`filtered_stderr`, which
  drops absl's banner, TensorFlow's INFO and WARNING lines, and the cuInit error
  where the machine has no NVIDIA driver (:func:`keep_line`). Every other line,
  Graft's own log included, goes through at once.

Setting ``TF_CPP_MIN_LOG_LEVEL`` (0: everything, 1: warnings and errors,
2: errors, 3: nothing) turns both off: TensorFlow then logs exactly as it does on
its own. Free of TensorFlow.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "2"
# absl's line prefix: severity, MMDD, time, thread id, file:line]. Before absl is set
# up the date and time print as 0000 00:00:<seconds since the epoch>.
_ABSL_PREFIX = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:[\d.]+\s+\d+ [^\s\]]+:\d+\] ")
_ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_CUINIT = b"failed call to cuInit"
_NVIDIA_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl")
# A child process that inherited the pipe would keep it open past the block.
_PUMP_JOIN_S = 5.0


def quiet_by_default(environ: MutableMapping[str, str]) -> bool:
    """Set ``TF_CPP_MIN_LOG_LEVEL`` to 2 unless it is set; True when Graft's quiet default applies."""
    if LEVEL_VARIABLE in environ:
        return False
    environ[LEVEL_VARIABLE] = DEFAULT_LEVEL
    return True


def has_nvidia_driver() -> bool:
    """Whether this machine (or container) has an NVIDIA driver, so that a failed cuInit means something."""
    return any(os.path.exists(path) for path in _NVIDIA_DRIVER_PATHS)


def keep_line(line: bytes, nvidia_driver: bool) -> bool:
    """Whether one line written to stderr passes Graft's quiet default (see the module doc)."""
    if line.rstrip(b"\r\n") == _ABSL_BANNER:
        return False
    prefix = _ABSL_PREFIX.match(line)
    if prefix is None:
        return True   # not TensorFlow's: Graft's own log, Python's warnings, a traceback
    if prefix.group(1) in (b"I", b"W"):
        return False
    return nvidia_driver or _CUINIT not in line


@contextmanager
def filtered_stderr(keep: Callable[[bytes], bool]) -> Iterator[None]:
    """Inside the block, pass each line written to file descriptor 2 through ``keep``, as it is written.

    Works below Python (TensorFlow's C++ writes to the descriptor itself): the
    descriptor becomes a pipe that a thread reads line by line, writing the kept
    lines to the real stderr.
    """
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, real, keep), name="graft-stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        # The pipe's last write end closes here: the pump reads what is left, then ends.
        os.dup2(real, 2)
        pump.join(_PUMP_JOIN_S)
        if not pump.is_alive():
            os.close(real)   # else the pump still writes there: leave the descriptor to it


def _pump(read_end: int, out: int, keep: Callable[[bytes], bool]) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            if keep(line):
                _write_all(out, line)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
