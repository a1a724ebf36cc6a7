"""TLS for gRPC from TF Serving's SSLConfig (REST's HTTPS is ``serving.rest.server``).

gRPC: ``--ssl_config_file`` is TF Serving's ``SSLConfig`` text proto, with the
PEM *contents* inline (``server_key``, ``server_cert``, ``custom_ca``) and
``client_verify``; :func:`grpc_server_credentials` turns it into
``grpc.ssl_server_credentials``. With ``client_verify`` a client must present
a certificate chaining to ``custom_ca`` (mutual TLS), as in TF Serving.

REST: ``--rest_tls_cert`` and ``--rest_tls_key`` (PEM files) make uvicorn serve
HTTPS (TLS 1.2 or later) on the REST port: :class:`serving.rest.server.RestServer`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from serving.config import parse_text_proto, read_config_file
from serving.protos.graft.ssl_config_pb2 import SSLConfig

_KEY_MARKERS = ("PRIVATE KEY-----",)


def parse_ssl_config(text: str) -> SSLConfig:
    """Parse an SSLConfig text proto and check it; ``ValueError`` names the problem."""
    config = parse_text_proto(text, SSLConfig())
    check_ssl_config(config)
    return config


def read_ssl_config(path: str | Path) -> SSLConfig:
    """Read ``--ssl_config_file`` (``serving.config.read_config_file``: errors name the flag and file)."""
    return read_config_file(path, "--ssl_config_file", parse_ssl_config)


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
