"""PlainWsgiServer: waitress served on its own thread, stopped without losing a response."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import requests
from waitress import trigger

from serving.wsgi import PlainWsgiServer

BIG = b"x" * (8 << 20)   # more than the socket buffers: the loop is still writing it at stop()


def app(environ, start_response):
    """Answers /slow after 0.5 s with 8 MiB, anything else at once with 'ok'."""
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.5)
        start_response("200 OK", [("Content-Length", str(len(BIG)))])
        return [BIG]
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


@pytest.fixture
def served():
    server = PlainWsgiServer(app, "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server, thread
    server.stop(timeout=2)


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_serves_then_stop_closes_the_port_and_ends_the_loop(served):
    server, thread = served
    assert requests.get(f"http://127.0.0.1:{server.port}/", timeout=5).content == b"ok"
    assert server.stop(timeout=5) is True
    thread.join(2)
    assert not thread.is_alive()
    assert refused(server.port)


def test_a_response_in_progress_at_stop_is_delivered_whole(served):
    server, thread = served
    got: list = []
    client = threading.Thread(target=lambda: got.append(
        requests.get(f"http://127.0.0.1:{server.port}/slow", timeout=10)))
    client.start()
    time.sleep(0.2)   # the request is in the app when stop() begins
    assert server.stop(timeout=10) is True
    client.join(10)
    assert got and got[0].status_code == 200 and got[0].content == BIG


def test_stop_closes_the_sockets_even_when_the_wake_up_pipe_is_broken(served):
    # CI once saw os.write(trigger) fail with EBADF at shutdown; the server then exited 1.
    server, thread = served
    waker = next(d for d in server._map.values() if isinstance(d, trigger.trigger))
    read_end, write_end = os.pipe()
    try:
        os.dup2(read_end, waker.trigger)   # writing to a read end: EBADF, like a closed fd
        with pytest.raises(OSError):
            waker.pull_trigger()
        started = time.monotonic()
        assert server.stop(timeout=5) is True
        assert time.monotonic() - started < 3   # the loop saw the stop flag after one select()
        thread.join(2)
        assert not thread.is_alive()
        assert refused(server.port)
    finally:
        os.close(read_end)
        os.close(write_end)
