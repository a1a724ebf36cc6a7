"""Start a real graft-serve for tests: in-process (threads) or as a subprocess.

Both paths go through ``serving.runtime.main``'s own flag parser and wiring, so a test
exercises exactly what ``graft-serve`` runs; nothing is stubbed. Servers bind
127.0.0.1: gRPC on port 0 (the bound port is read back), REST on a free port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import requests
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.runtime.server import GraftServer
from serving.runtime.settings import ServerConfig
from serving.runtime.process import ServeProcess
from tests.ports import free_port

READY_TIMEOUT_S = 90.0


class BrokenService:
    """Just enough of InferenceService for the servers to start and answer health; the calls
    that read models (the model list, a model's status) fail the way a bug would."""

    draining = False

    def live(self) -> bool:
        """Always alive."""
        return True

    def ready(self) -> bool:
        """Always ready."""
        return True

    def list_models(self):
        """A bug."""
        raise RuntimeError("bug in the service")

    def model_status(self, name, version, label):
        """A bug."""
        raise RuntimeError("bug in the service")


class Client:
    """Handles on a running server: REST base URL, a gRPC channel and the TF Serving stubs."""

    def __init__(self, grpc_port: int, rest_port: int | None):
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        self.rest = f"http://127.0.0.1:{rest_port}" if rest_port else None
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.http = requests.Session()

    def close(self) -> None:
        """Close the channel and the HTTP session."""
        self.channel.close()
        self.http.close()


def _wait_ready(rest: str, timeout: float = READY_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = requests.get(f"{rest}/readyz", timeout=2)
            if last.status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not ready after {timeout}s: {last and last.text}")


@contextmanager
def serving(**settings) -> Iterator[tuple[GraftServer, Client]]:
    """Run graft-serve in this process with ``ServerConfig(**settings)`` until the block ends.

    It binds 127.0.0.1: gRPC on a port of the kernel's choice, REST on a free port.
    """
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "rest_api_port": free_port(), **settings})
    server = GraftServer(config)
    server.start()
    client = Client(server.grpc_port, server.rest_port)
    try:
        _wait_ready(client.rest)
        yield server, client
    finally:
        client.close()
        server.drain_and_stop()


class Subprocess(ServeProcess):
    """A graft-serve child process on 127.0.0.1; ports come from its startup log lines."""

    def __init__(self, flags: Sequence[str], log_path: Path):
        super().__init__(["--host", "127.0.0.1", *flags], log_path)
        try:
            self.grpc_port, self.rest_port = self.bound_ports(READY_TIMEOUT_S)
            self.client = Client(self.grpc_port, self.rest_port)
            _wait_ready(self.client.rest)
        except BaseException:
            # A server that never became ready must not outlive the test that started it.
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            raise

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (if still running) and wait; returns the exit code."""
        try:
            return super().stop(timeout)
        finally:
            self.client.close()
