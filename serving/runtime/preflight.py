"""Checks before work: every file, port and CPU setting of a ServerConfig, tried before any model loads.

:func:`preflight` reads and checks each file the config names
(``--model_config_file``, ``--batching_parameters_file``,
``--monitoring_config_file``, ``--auth_token_file``, ``--ssl_config_file``,
``--rest_tls_cert`` with ``--rest_tls_key``), splits the CPUs for
``--tensorflow_cpus``, and binds each TCP port once to see that it is free.
Every problem is a ``ValueError`` whose one-line message starts with the flag.

Free of TensorFlow: graft-serve runs it before importing TensorFlow, so a bad
file or a taken port is reported in a fraction of a second, before any of
TensorFlow's own log lines; ``GraftServer.start`` takes what it read (or runs it
itself for a program that builds the server directly).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from dataclasses import dataclass

from serving.config import (
    BatchingConfig,
    ModelConfig,
    read_batching_parameters_file,
    read_model_config_file,
    read_monitoring_config_file,
    single_model_config,
)
from serving.metrics import DEFAULT_METRICS_PATHS
from serving.protos.graft.ssl_config_pb2 import SSLConfig
from serving.runtime.affinity import CpuSplit, split_cpus
from serving.runtime.auth import TokenAuth
from serving.runtime.settings import ServerConfig
from serving.runtime.tls import read_ssl_config

log = logging.getLogger("graft-serve")


@dataclass(frozen=True)
class Preflight:
    """What a ServerConfig's files hold, read and checked, and the CPU split it asks for."""

    models: list[ModelConfig]
    batching: BatchingConfig | None
    metrics_paths: tuple[str, ...]
    auth: TokenAuth | None
    ssl: SSLConfig | None
    cpu_split: CpuSplit | None


def preflight(config: ServerConfig) -> Preflight:
    """Read every file ``config`` names and try its ports; ``ValueError`` naming the flag otherwise."""
    models = (read_model_config_file(config.model_config_file) if config.model_config_file
              else [single_model_config(config.model_name, config.model_base_path)])
    metrics_paths = metrics_paths_of(config)
    auth = (TokenAuth.from_file(config.auth_token_file, protect_metrics=config.auth_metrics,
                                metrics_paths=metrics_paths) if config.auth_token_file else None)
    checked = Preflight(
        models=models,
        batching=batching_config(config),
        metrics_paths=metrics_paths,
        auth=auth,
        ssl=read_ssl_config(config.ssl_config_file) if config.ssl_config_file else None,
        cpu_split=split_cpus(config.tensorflow_cpus) if config.tensorflow_cpus else None,
    )
    if config.rest_api_port:
        check_rest_tls(config.rest_tls_cert, config.rest_tls_key)
    check_port("--port", config.host, config.port)
    if config.rest_api_port:
        check_port("--rest_api_port", config.host, config.rest_api_port)
    return checked


def batching_config(config: ServerConfig) -> BatchingConfig | None:
    """The batching parameters in force: None with batching off, the file's, else TF Serving's defaults."""
    if not config.batching_enabled:
        if config.batching_parameters_file:
            log.warning("--batching_parameters_file %s is ignored: --enable_batching is false",
                        config.batching_parameters_file)
        return None
    if config.batching_parameters_file:
        return read_batching_parameters_file(config.batching_parameters_file)
    return BatchingConfig()


def metrics_paths_of(config: ServerConfig) -> tuple[str, ...]:
    """The REST paths that serve metrics (none: no registry at all)."""
    if not config.enable_metrics:
        return ()
    if not config.monitoring_config_file:
        return DEFAULT_METRICS_PATHS
    return read_monitoring_config_file(config.monitoring_config_file)


def check_rest_tls(certfile: str, keyfile: str) -> None:
    """Load the REST certificate chain and its key as the HTTPS server will; ValueError naming the flag."""
    if not (certfile or keyfile):
        return
    for flag, path in (("--rest_tls_cert", certfile), ("--rest_tls_key", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--rest_tls_cert {certfile} / --rest_tls_key {keyfile}: cannot load the certificate "
                         f"and key: {exc}") from None


def check_port(flag: str, host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go; ValueError naming ``flag`` when it is taken or not allowed.

    Port 0 (the kernel picks one) is always free. The server binds the port again
    itself; this only moves the failure before any model loads.
    """
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: cannot resolve it: {exc.strerror}") from None
    try:
        with socket.socket(family, kind, proto) as probe:
            # As both servers bind: an old connection in TIME_WAIT does not make the port taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        problem = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
        raise ValueError(f"{flag} {port}: {host}:{port} {problem}") from None
