"""``graft-console``: the command line, served by waitress.

waitress is a pure-Python WSGI server with a thread pool: no fork model, no C
extension, so it runs the same in a container, on a laptop and on any OS, and
a console's few users and its blocking reads (the repository, graft-serve) fit
its threads. A promote action evaluates a model for seconds; a thread waits for
it while the others keep answering.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from console.app import create_app
from console.config import DEFAULT_PORT, DEFAULT_SERVE_TIMEOUT_S, ConsoleConfig

# Enough for a few operators and the page's image requests while a promotion evaluates.
THREADS = 8


def build_parser() -> argparse.ArgumentParser:
    """The flags of graft-console."""
    parser = argparse.ArgumentParser(
        prog="graft-console", description="The Graft model repository and graft-serve's live state in a browser.")
    parser.add_argument("--repo", required=True, help="folder holding the models' base paths (<repo>/<model>/<N>)")
    parser.add_argument("--serve_url", action="append", default=[], metavar="URL",
                        help="a graft-serve REST endpoint (http://HOST:8501); repeat for several")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--auth_token_file", default=None,
                        help="graft-serve's token file: enables rollback and promote for holders of a token "
                             "(without it the console is read-only)")
    parser.add_argument("--eval_data", default=None,
                        help="held-out class folders the promote action's gate evaluates on "
                             "(without it only rollback is offered)")
    parser.add_argument("--report_dir", default=None,
                        help="folder of 'graft-train promote --report' JSON files whose held-out evaluations "
                             "the version pages show")
    parser.add_argument("--serve_timeout", type=float, default=DEFAULT_SERVE_TIMEOUT_S,
                        help=f"seconds before a serve URL counts as down (default {DEFAULT_SERVE_TIMEOUT_S:g})")
    parser.add_argument("--secret_key_file", default=None,
                        help="key signing the session cookie (CSRF); random per process when absent")
    return parser


def config_from_args(args: argparse.Namespace) -> ConsoleConfig:
    """The ConsoleConfig the flags describe; ValueError naming the flag when one is wrong."""
    if not os.path.isdir(args.repo):
        raise ValueError(f"--repo {args.repo}: not a directory")
    if args.eval_data is not None and not os.path.isdir(args.eval_data):
        raise ValueError(f"--eval_data {args.eval_data}: not a directory")
    secret = b""
    if args.secret_key_file:
        try:
            with open(args.secret_key_file, "rb") as handle:
                secret = handle.read().strip()
        except OSError as exc:
            raise ValueError(f"--secret_key_file {args.secret_key_file}: {exc.strerror or exc}") from None
        if len(secret) < 16:
            raise ValueError(f"--secret_key_file {args.secret_key_file}: at least 16 bytes")
    return ConsoleConfig(repo=args.repo, serve_urls=tuple(args.serve_url), auth_token_file=args.auth_token_file,
                         eval_data=args.eval_data, report_dir=args.report_dir, serve_timeout_s=args.serve_timeout,
                         secret_key=secret)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, build the app and serve it until interrupted; 2 for bad flags."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        app = create_app(config)
    except ValueError as exc:
        print(f"graft-console: {exc}", file=sys.stderr)
        return 2
    # Heavy-ish and only needed to serve: tests build the app without it.
    import waitress

    mode = "actions enabled" if config.auth_token_file else "read-only"
    print(f"graft-console: {config.repo} on http://{args.host}:{args.port} ({mode})", flush=True)
    waitress.serve(app, host=args.host, port=args.port, threads=THREADS, ident="graft-console")
    return 0


if __name__ == "__main__":
    sys.exit(main())
