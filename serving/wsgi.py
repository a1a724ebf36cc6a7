"""Plain-HTTP REST through waitress, with a stop that finishes the responses being written.

:class:`PlainWsgiServer` has the same face as :class:`serving.tls.TlsWsgiServer`
(bound on construction, ``port``, ``serve()`` on its own thread, ``stop()``), so
the server's lifecycle treats HTTP and HTTPS alike.

Why not ``waitress.create_server(...).run()`` and ``close()``: waitress's sockets
may only be closed on its event-loop thread (closing them under its ``select()``
fails with EBADF, Pylons/waitress#468), and the documented way into that thread,
pulling the trigger pipe, is one more file descriptor that must be intact at
shutdown. Here the loop runs one ``select()`` at a time and checks a stop flag
between them, so it closes its own sockets even if the wake-up write fails.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from waitress import create_server, trigger, wasyncore

log = logging.getLogger(__name__)


class PlainWsgiServer:
    """A WSGI app served over plain HTTP by waitress; bound on construction, served by :meth:`serve`.

    ``options`` are waitress's own settings (``threads``, ``max_request_body_size``,
    ``recv_bytes``...). Raises ``OSError`` when the address cannot be bound.
    """

    def __init__(self, app, host: str, port: int, **options):
        self._map: dict = {}
        self._server = create_server(app, map=self._map, host=host, port=port, **options)
        self._stopping = threading.Event()
        self._closed = threading.Event()

    @property
    def port(self) -> int:
        """The TCP port actually bound (several listen sockets, for IPv4 and IPv6, share it)."""
        if hasattr(self._server, "effective_port"):
            return int(self._server.effective_port)
        return int(self._server.effective_listen[0][1])

    @property
    def settings(self):
        """waitress's effective settings (``waitress.adjustments.Adjustments``)."""
        return self._server.adj

    def serve(self) -> None:
        """Serve until :meth:`stop`, then close every socket (blocks; run it on its own thread)."""
        adj = self._server.adj
        try:
            while not self._stopping.is_set() and self._map:
                wasyncore.loop(timeout=adj.asyncore_loop_timeout, map=self._map,
                               use_poll=adj.asyncore_use_poll, count=1)
        finally:
            wasyncore.close_all(self._map, ignore_all=True)
            self._closed.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Let the worker threads finish, flush what they wrote, then close every socket.

        Returns True when the sockets were closed within ``timeout`` seconds.
        """
        end = time.monotonic() + timeout
        self._server.task_dispatcher.shutdown(cancel_pending=False, timeout=timeout)
        # Responses are written out by the loop thread; give it time to empty the buffers.
        while time.monotonic() < end and any(
                getattr(channel, "total_outbufs_len", 0) for channel in list(self._map.values())):
            time.sleep(0.02)
        self._stopping.set()
        self._wake_loop()
        closed = self._closed.wait(max(0.1, end - time.monotonic()))
        if not closed:
            log.warning("REST sockets still open after %.1fs", timeout)
        return closed

    def _wake_loop(self) -> None:
        # Only saves the rest of one select() timeout: the loop sees the stop flag anyway.
        for waker in [d for d in list(self._map.values()) if isinstance(d, trigger.trigger)]:
            with contextlib.suppress(OSError):
                waker.pull_trigger()
