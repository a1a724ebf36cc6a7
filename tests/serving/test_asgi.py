"""RestServer: uvicorn on its own thread and loop, stopped without losing a response; its header limit."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import pytest
import requests
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from serving.rest.server import MAX_REQUEST_HEADER_BYTES, RestServer
from serving.runtime.loop import run_blocking
from tests.serving.server import BrokenService

BIG = b"x" * (8 << 20)   # more than the socket buffers: the loop is still writing it at stop()


async def slow(_request):
    await asyncio.sleep(0.5)
    return Response(BIG)


async def in_thread(_request):
    return Response(await run_blocking(lambda: threading.current_thread().name))


async def ok(_request):
    return Response(b"ok")


APP = Starlette(routes=[Route("/slow", slow), Route("/thread", in_thread), Route("/{path:path}", ok)])


@pytest.fixture(params=["uvloop", "asyncio"])
def served(request):
    server = RestServer(APP, "127.0.0.1", 0, threads=2, event_loop=request.param)
    assert server.event_loop == request.param
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server, thread
    server.stop(timeout=2)


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_serves_then_stop_closes_the_port_and_ends_the_loop(served):
    server, thread = served
    r = requests.get(f"http://127.0.0.1:{server.port}/", timeout=5)
    assert r.content == b"ok" and r.headers["Server"] == "graft-serve"
    assert server.stop(timeout=5) is True
    thread.join(2)
    assert not thread.is_alive()
    assert refused(server.port)


def test_blocking_calls_run_in_the_servers_worker_threads(served):
    server, _ = served
    assert requests.get(f"http://127.0.0.1:{server.port}/thread", timeout=5).text.startswith("rest_")


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
    assert refused(server.port)


def test_headers_over_the_limit_get_431_and_the_server_keeps_serving(served):
    server, _ = served
    url = f"http://127.0.0.1:{server.port}/"
    near = {"X-Padding": "a" * (MAX_REQUEST_HEADER_BYTES - 1024)}
    assert requests.get(url, headers=near, timeout=10).status_code == 200
    for headers, path in [({"X-Padding": "a" * (MAX_REQUEST_HEADER_BYTES + 1)}, ""),
                          ({f"X-{i}": "b" * 1000 for i in range(300)}, ""),
                          ({}, "q" * (MAX_REQUEST_HEADER_BYTES + 1))]:
        r = requests.get(url + path, headers=headers, timeout=10)
        assert r.status_code == 431, r.text
        assert r.json()["error"] == f"Request line and headers exceed the limit of {MAX_REQUEST_HEADER_BYTES} bytes"
    assert requests.get(url, timeout=5).content == b"ok"


def test_a_taken_port_and_an_unknown_loop_are_refused_at_construction():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            RestServer(APP, "127.0.0.1", taken.getsockname()[1])
    with pytest.raises(ValueError, match="^--rest_event_loop must be one of"):
        RestServer(APP, "127.0.0.1", 0, event_loop="trio")


def test_an_unexpected_error_is_a_json_500_and_the_server_keeps_serving(caplog):
    from serving.rest.app import create_app

    server = RestServer(create_app(BrokenService()), "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        r = requests.get(f"http://127.0.0.1:{server.port}/v1/models", timeout=5)
        assert r.status_code == 500
        # The client gets a request id, never the exception's text or type.
        error = r.json()["error"]
        match = re.fullmatch(r"Internal error \(request id ([0-9a-f]{16})\); the server log has the details", error)
        assert match, error
        assert requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).json() == {"status": "alive"}
    finally:
        server.stop(timeout=2)
    # The traceback is logged once, under the same id.
    assert caplog.text.count("RuntimeError: bug in the service") == 1
    assert f"request id {match.group(1)}" in caplog.text and "Traceback" in caplog.text


def test_a_client_gone_mid_body_is_no_server_error(caplog):
    from serving.rest.app import create_app

    server = RestServer(create_app(BrokenService()), "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inst")
            time.sleep(0.2)
        time.sleep(0.3)
        assert requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    finally:
        server.stop(timeout=2)
    assert "Exception in ASGI application" not in caplog.text
