"""graft-serve as a child process: start it, wait until it is ready, read its log, stop it.

The demo, the benchmarks and the tests all drive the real binary this way, so
they start, watch and stop it identically: SIGTERM first (graft-serve drains
in-flight requests, then exits 0), SIGKILL only if it outlives the timeout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

READY_TIMEOUT_S = 120.0

# graft-serve's startup lines, worded as TF Serving's, name the ports it bound.
_GRPC_LINE = re.compile(r"Running gRPC ModelServer at [^:\s]+:(\d+)")
_REST_LINE = re.compile(r"Exporting HTTP/REST API at:[^:\s]+:(\d+)")


def serve_command(python: str = sys.executable) -> list[str]:
    """The command that runs graft-serve beside ``python``: its console script, else ``-m serving.runtime.main``."""
    script = Path(python).with_name("graft-serve")
    return [str(script)] if script.exists() else [python, "-m", "serving.runtime.main"]


class ServeProcess:
    """One graft-serve child process with ``flags``; stdout and stderr go to ``log_path``."""

    def __init__(self, flags: Sequence[str], log_path: str | os.PathLike, *,
                 python: str = sys.executable, env: Mapping[str, str] | None = None):
        self.command = [*serve_command(python), *flags]
        self.log_path = Path(log_path)
        # TF_CPP_MIN_LOG_LEVEL stays as the caller has it: unset, graft-serve keeps TensorFlow quiet.
        environment = dict(os.environ if env is None else env)
        environment["PYTHONUNBUFFERED"] = "1"  # the startup lines must reach the log at once
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=environment)

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log().splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"graft-serve exited with {self.proc.returncode}:\n{self.log_tail(60)}")

    def bound_ports(self, timeout: float = READY_TIMEOUT_S) -> tuple[int, int | None]:
        """(gRPC port, REST port or None) as the startup log reports them (useful with ``--port 0``)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log()
            grpc_match, rest_match = _GRPC_LINE.search(text), _REST_LINE.search(text)
            if grpc_match and (rest_match or self._rest_disabled()):
                return int(grpc_match[1]), int(rest_match[1]) if rest_match else None
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"graft-serve printed no ports within {timeout:g} s:\n{self.log_tail(60)}")

    def _rest_disabled(self) -> bool:
        # --rest_api_port 0 (either spelling) means graft-serve prints no REST line.
        args = self.command
        return "--rest_api_port=0" in args or any(
            a == "--rest_api_port" and b == "0" for a, b in zip(args, args[1:]))

    def wait_ready(self, rest_url: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until ``rest_url``/readyz answers 200; RuntimeError with the log if the server died."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{rest_url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 until every model has a version
            time.sleep(0.2)
        raise TimeoutError(f"graft-serve not ready after {timeout:g} s:\n{self.log_tail(60)}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains, then exits) and wait; SIGKILL past ``timeout``. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()
