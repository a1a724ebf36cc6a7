"""The serving image's health check: is the graft-serve of this container alive, on the port it was given?

The image's entrypoint (``docker/serve-entrypoint.sh``) writes graft-serve's
whole command line to ``$GRAFT_SERVE_ARGS_FILE`` (NUL-separated) before it
starts it. ``python3 -m serving.runtime.probe`` (the Dockerfile's HEALTHCHECK)
reads it back with graft-serve's own parser, so the check follows
``--rest_api_port`` in any spelling, ``--host`` and HTTPS (``--rest_tls_cert``),
and asks ``/healthz`` there; with REST off (``--rest_api_port=0``) it connects to
the gRPC port instead. No file (an entrypoint that could not write it): the
image's defaults, REST on 8501. Exit 0 healthy, 1 not, as Docker expects.
Free of TensorFlow: a check costs a fraction of a second.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.runtime.main import build_parser

ARGS_FILE_VARIABLE = "GRAFT_SERVE_ARGS_FILE"
DEFAULT_ARGS_FILE = "/tmp/graft-serve.args"
TIMEOUT_S = 4.0
_ANY_ADDRESS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Target:
    """Where to look: ``url`` of ``/healthz``, or with REST off, the gRPC ``host`` and ``port``."""

    url: str | None
    host: str
    port: int


def target(argv: Sequence[str]) -> Target:
    """The health endpoint of a graft-serve started with ``argv`` (parsed as graft-serve parses it)."""
    args, _ = build_parser().parse_known_args(list(argv))
    # A server bound to every address answers on loopback; one bound to a single address only there.
    host = "127.0.0.1" if args.host in _ANY_ADDRESS else args.host
    if not args.rest_api_port:
        return Target(None, host, args.port)
    scheme = "https" if args.rest_tls_cert else "http"
    shown = f"[{host}]" if ":" in host else host
    return Target(f"{scheme}://{shown}:{args.rest_api_port}/healthz", host, args.rest_api_port)


def read_args(path: str | os.PathLike) -> list[str]:
    """The command line the entrypoint wrote (empty when there is no file)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [part.decode() for part in data.split(b"\0")[:-1]]


def healthy(where: Target) -> bool:
    """Whether graft-serve answers there: /healthz 200, or the gRPC port accepts a connection."""
    try:
        if where.url is None:
            with socket.create_connection((where.host, where.port), timeout=TIMEOUT_S):
                return True
        with urllib.request.urlopen(where.url, timeout=TIMEOUT_S, context=_liveness_tls()) as answer:
            return answer.status == 200
    except OSError as exc:
        print(f"graft-serve health check: {where.url or f'{where.host}:{where.port}'}: {exc}", file=sys.stderr)
        return False


def _liveness_tls() -> ssl.SSLContext:
    # The probe checks liveness, not the certificate (often self-signed inside a cluster).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def main(environ: Mapping[str, str] = os.environ) -> int:
    """Exit code of the health check: 0 when graft-serve answers, 1 otherwise."""
    where = target(read_args(environ.get(ARGS_FILE_VARIABLE, DEFAULT_ARGS_FILE)))
    return 0 if healthy(where) else 1


if __name__ == "__main__":
    raise SystemExit(main())
