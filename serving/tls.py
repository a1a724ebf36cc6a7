"""TLS for both ports: gRPC from TF Serving's SSLConfig, REST through cheroot.

gRPC: ``--ssl_config_file`` is TF Serving's ``SSLConfig`` text proto, with the
PEM *contents* inline (``server_key``, ``server_cert``, ``custom_ca``) and
``client_verify``; :func:`grpc_server_credentials` turns it into
``grpc.ssl_server_credentials``. With ``client_verify`` a client must present
a certificate chaining to ``custom_ca`` (mutual TLS), as in TF Serving.

REST: waitress speaks only plain HTTP, so with ``--rest_tls_cert`` and
``--rest_tls_key`` (PEM files) the same WSGI app is served by cheroot (CherryPy's
server) with a subclass of its builtin ``ssl`` adapter that moves the handshake
off cheroot's accept loop onto the worker thread: :class:`TlsWsgiServer`. Plain
HTTP keeps waitress.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import grpc
from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from google.protobuf import text_format

from serving.protos.graft.ssl_config_pb2 import SSLConfig

log = logging.getLogger(__name__)

# A listen backlog like waitress's (cheroot's default of 5 drops connections in bursts).
LISTEN_BACKLOG = 1024
# Seconds an idle or slow connection may hold a socket (cheroot's default).
SOCKET_TIMEOUT_S = 10
# At shutdown the service has drained already; workers left are idle keep-alive reads.
SHUTDOWN_TIMEOUT_S = 2
# Request line + headers, as waitress limits them (cheroot's default 0 means unlimited).
MAX_REQUEST_HEADER_BYTES = 256 * 1024
_KEY_MARKERS = ("PRIVATE KEY-----",)


def parse_ssl_config(text: str) -> SSLConfig:
    """Parse an SSLConfig text proto and check it; ``ValueError`` names the problem."""
    config = SSLConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ValueError(f"not an SSLConfig text proto: {exc}") from None
    check_ssl_config(config)
    return config


def read_ssl_config(path: str | Path) -> SSLConfig:
    """Read ``--ssl_config_file``; ``ValueError`` names the file (``OSError`` when unreadable)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return parse_ssl_config(text)
    except ValueError as exc:
        raise ValueError(f"--ssl_config_file {path}: {exc}") from None


def check_ssl_config(config: SSLConfig) -> None:
    """Refuse an SSLConfig gRPC could not use, with a message naming the field."""
    if not config.server_key.strip() or not any(m in config.server_key for m in _KEY_MARKERS):
        raise ValueError("server_key must hold the server's private key, PEM")
    _check_certificates(config.server_cert, "server_cert")
    if config.custom_ca.strip():
        _check_certificates(config.custom_ca, "custom_ca")
    elif config.client_verify:
        # Without a CA there is nothing to verify a client certificate against.
        raise ValueError("client_verify needs custom_ca (the CA that signs client certificates)")


def _check_certificates(pem: str, field: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"{field} must hold PEM certificates")
    try:
        # Parses every certificate in memory; no file is written.
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{field} is not valid PEM: {exc}") from None


def grpc_server_credentials(config: SSLConfig) -> grpc.ServerCredentials:
    """``grpc.ssl_server_credentials`` for an SSLConfig (client certificates required with client_verify)."""
    check_ssl_config(config)
    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() if config.custom_ca.strip() else None,
        require_client_auth=config.client_verify,
    )


class TlsWsgiServer:
    """A WSGI app served over HTTPS by cheroot; bound on construction, served by :meth:`serve`.

    Raises ``ValueError`` naming the flag when the certificate or key cannot be
    loaded (or do not match), ``OSError`` when the address cannot be bound.
    """

    def __init__(self, app, host: str, port: int, certfile: str, keyfile: str, *,
                 threads: int = 8, max_request_body_size: int = 0):
        for flag, path in (("--rest_tls_cert", certfile), ("--rest_tls_key", keyfile)):
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        try:
            adapter = _WorkerHandshakeAdapter(certfile, keyfile)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"--rest_tls_cert/--rest_tls_key: cannot load the certificate and key: {exc}") from None
        adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server = _CherootServer(
            (host, port), app, numthreads=threads, server_name="graft-serve",
            request_queue_size=LISTEN_BACKLOG, timeout=SOCKET_TIMEOUT_S, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        self._server.ssl_adapter = adapter
        # Keep this above the app's own limit, which answers 413 with a JSON body (0: no limit).
        self._server.max_request_body_size = max_request_body_size
        self._server.max_request_header_size = MAX_REQUEST_HEADER_BYTES
        self._server.prepare()  # binds and listens, so the port is known (and errors surface) now

    @property
    def port(self) -> int:
        """The TCP port actually bound."""
        return int(self._server.bind_addr[1])

    def serve(self) -> None:
        """Serve until :meth:`stop` (blocks; run it on its own thread)."""
        self._server.serve()

    def stop(self) -> None:
        """Stop accepting, close connections, and wait (bounded) for the worker threads."""
        self._server.stop()


class _WorkerHandshakeAdapter(BuiltinSSLAdapter):
    """cheroot's builtin adapter, minus the handshake on the accept loop.

    The stock adapter completes the handshake inside ``accept``, on cheroot's one
    selector thread, so a single client that connects and sends nothing stalls
    every new connection for the socket timeout (cheroot#748, #709). Here the
    socket is only wrapped; :class:`_Connection` shakes hands on the worker thread.
    """

    def wrap(self, sock):
        """Wrap without handshaking; no per-connection TLS variables are put in the WSGI environ."""
        return self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True), {}


class _Connection(cheroot_server.HTTPConnection):
    """An HTTP connection that completes the TLS handshake on its worker thread first."""

    _handshaken = False

    def communicate(self):
        """Shake hands once (bounded by the socket timeout), then serve requests as cheroot does."""
        if not self._handshaken:
            try:
                self.socket.do_handshake()
            except OSError as exc:  # ssl.SSLError, timeouts and resets are all OSError
                log.debug("TLS handshake with %s failed: %s", getattr(self, "remote_addr", "?"), exc)
                return False
            self._handshaken = True
        return super().communicate()


class _CherootServer(wsgi.Server):
    """cheroot's WSGI server with worker-thread handshakes, logging through ``logging``."""

    ConnectionClass = _Connection

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        """Route cheroot's messages (failed handshakes, socket errors) to this module's logger."""
        log.log(level, "%s", msg, exc_info=traceback)
