"""REST over HTTP or HTTPS: the ASGI app under uvicorn, on an event loop thread of its own.

:class:`RestServer` is bound on construction (so a taken port or a bad
certificate fails before anything is served), serves from :meth:`serve` on its
own thread, and :meth:`stop` stops accepting, lets the responses in flight
finish, and closes every connection.

Why uvicorn (httptools' C parser on a uvloop loop) and not a threaded WSGI
server: a predict request spends most of its life waiting for its batch. Under
waitress each waiting request held a thread, and every batch woke a dozen
threads that fought for the GIL on the one core left to them; here the waiting
costs nothing and a finished batch wakes the loop once (docs/benchmarks.md has
the measured difference).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.runtime.loop import loop_kind, new_event_loop

log = logging.getLogger(__name__)

# Pending connections the kernel queues for accept() (bursts of new clients).
LISTEN_BACKLOG = 2048
# An idle keep-alive connection is kept this long. Longer than the 60 s idle timeout
# of common load balancers: the balancer, not the server, should close first, or it
# may send a request into a connection the server is closing (a 502 for the client).
KEEP_ALIVE_S = 75
SERVER_NAME = "graft-serve"
# Request line + headers. httptools sets no limit of its own; this is waitress's.
MAX_REQUEST_HEADER_BYTES = 256 * 1024


class RestServer:
    """An ASGI app served over HTTP (or HTTPS with ``certfile``/``keyfile``) by uvicorn.

    ``threads`` worker threads run the app's blocking calls (the loop's default
    executor); ``event_loop`` is a kind of :func:`serving.runtime.loop.new_event_loop`.
    Raises ``OSError`` when the address cannot be bound, ``ValueError`` naming the
    flag when the certificate or key cannot be loaded or the loop cannot be made.
    """

    def __init__(self, app, host: str, port: int, *, threads: int = 8, certfile: str = "",
                 keyfile: str = "", event_loop: str = "auto"):
        tls = bool(certfile or keyfile)
        if tls:
            for flag, path in (("--rest_tls_cert", certfile), ("--rest_tls_key", keyfile)):
                if not path or not Path(path).is_file():
                    raise ValueError(f"{flag} {path}: no such file")
        self._config = uvicorn.Config(
            app, http=BoundedHeadersProtocol, ws="none", lifespan="off", interface="asgi3",
            log_config=None, log_level=logging.WARNING, access_log=False,
            server_header=False, headers=[("server", SERVER_NAME)],
            # Clients reach the server directly or through a balancer we do not know:
            # trust no X-Forwarded-* header.
            proxy_headers=False,
            backlog=LISTEN_BACKLOG, timeout_keep_alive=KEEP_ALIVE_S,
            ssl_certfile=certfile or None, ssl_keyfile=keyfile or None,
            ssl_context_factory=_tls12_or_later if tls else None)
        try:
            self._config.load()
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"--rest_tls_cert/--rest_tls_key: cannot load the certificate and key: {exc}") from None
        self._loop = new_event_loop(event_loop, "--rest_event_loop")
        self.event_loop = loop_kind(self._loop)
        self.tls = tls
        try:
            self._socket = _listen(host, port)
        except OSError:
            self._loop.close()
            raise
        self.port: int = self._socket.getsockname()[1]
        """The TCP port actually bound."""
        self._workers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rest")
        self._loop.set_default_executor(self._workers)
        self._server = uvicorn.Server(self._config)
        self._done = threading.Event()

    def serve(self) -> None:
        """Serve until :meth:`stop` (blocks; run it on its own thread)."""
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._server.serve(sockets=[self._socket]))
        finally:
            self._socket.close()
            self._loop.close()
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._done.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop accepting, let responses in flight finish (up to ``timeout`` s), close every connection.

        Returns True when the server had closed everything within ``timeout`` seconds.
        """
        # Read by uvicorn's shutdown, which starts after it sees should_exit (within 0.1 s).
        self._config.timeout_graceful_shutdown = max(1, round(timeout))
        self._server.should_exit = True
        closed = self._done.wait(timeout + 1.0)
        if not closed:
            log.warning("REST connections still open after %.1fs", timeout)
        return closed


class BoundedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering 431 to a request line + headers over the limit.

    Without a limit a client could grow one request's headers until memory runs out.
    """

    _header_bytes = 0
    _headers_too_large = False

    def on_message_begin(self) -> None:
        """A new request: its header count starts at zero."""
        self._header_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        """Count the request target against the limit."""
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count one header against the limit."""
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_REQUEST_HEADER_BYTES:
            self._headers_too_large = True
            # Raised in a parser callback: feed_data fails, and uvicorn answers through
            # send_400_response, below, and closes the connection.
            raise ValueError("request header fields too large")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to an unparseable request; 431 with a JSON error when the headers were too large."""
        if not self._headers_too_large:
            super().send_400_response(msg)
            return
        body = json.dumps({"error": f"Request line and headers exceed the limit of "
                                    f"{MAX_REQUEST_HEADER_BYTES} bytes"}).encode()
        head = [STATUS_LINE[431], *(name + b": " + value + b"\r\n" for name, value in
                                    self.server_state.default_headers)]
        self.transport.write(b"".join([
            *head, b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n\r\n", body]))
        self.transport.close()


def _tls12_or_later(_config: uvicorn.Config, default_context) -> ssl.SSLContext:
    context = default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port ("::" listens on IPv6 and, where possible, IPv4)."""
    family, *_, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE)[0]
    dualstack = family == socket.AF_INET6 and address[0] == "::" and socket.has_dualstack_ipv6()
    return socket.create_server(address[:2], family=family, backlog=LISTEN_BACKLOG, dualstack_ipv6=dualstack)
