"""graft-serve's command line: TF Serving's flags -> a ServerConfig -> a running GraftServer.

Every flag of TF Serving's ``tensorflow_model_server`` 2.x is accepted, with its
name and (except ``--rest_api_port``, 8501 here) its default: most are
implemented, the rest are kept in ``ServerConfig.inert_flags`` and logged at
start with why they have no effect (``serving.runtime.compat``; docs/flags.md).
Booleans take absl's forms: ``--flag``, ``--flag=true|false`` and ``--noflag``.
Abbreviations are refused, as TF Serving refuses them.

The parser, the config and the checks before work (``serving.runtime.preflight``)
are free of TensorFlow, so ``--help``, ``--version``, usage errors, a bad file and a
taken port all answer at once; TensorFlow loads only once they pass, with its own
logging quiet by default (``serving.runtime.tflog``).
SIGTERM / SIGINT drain instead of dropping work (``GraftServer.drain_and_stop``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from importlib import metadata

from serving.runtime import tflog
from serving.runtime.compat import INERT_FLAGS
from serving.runtime.loop import EVENT_LOOPS
from serving.runtime.preflight import preflight
from serving.runtime.settings import ServerConfig, field_default

log = logging.getLogger("graft-serve")

# Shown in --help; the server derives the real counts (serving.runtime.server.handler_threads).
MAX_BATCHING_THREADS = 256


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "t", "yes", "y", "on"):
        return True
    if value in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _channel_arguments(text: str) -> tuple[tuple[str, int | str], ...]:
    """TF Serving's --grpc_channel_arguments: "key=value,...", a value that reads as an integer is one."""
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        try:
            arguments.append((key.strip(), int(value)))
        except ValueError:
            arguments.append((key.strip(), value.strip()))
    return tuple(arguments)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: one flag per ServerConfig field, with the field's default."""
    d = field_default
    p = argparse.ArgumentParser(
        prog="graft-serve", allow_abbrev=False,
        description="Serve versioned TensorFlow SavedModels over TF-Serving-compatible gRPC and REST. "
                    "Every flag of TF Serving's tensorflow_model_server is accepted (docs/flags.md); a "
                    "boolean flag also takes --flag=true|false and --noflag.",
        epilog="TensorFlow's own log lines are quiet by default; set TF_CPP_MIN_LOG_LEVEL (0: all, "
               "1: warnings and errors, 2: errors) to see them as TensorFlow prints them.")
    boolean = functools.partial(_add_boolean, p)
    p.add_argument("--port", type=_port, default=d("port"), help="gRPC port (default 8500; 0 picks a free one)")
    p.add_argument("--rest_api_port", type=_port, default=d("rest_api_port"),
                   help="REST port (default 8501; 0 disables REST)")
    p.add_argument("--host", default=d("host"), help="bind address for both servers (default 0.0.0.0)")
    p.add_argument("--model_name", default=d("model_name"),
                   help="model name with --model_base_path (default 'default')")
    p.add_argument("--model_base_path", default=d("model_base_path"),
                   help="directory holding the model's version directories")
    p.add_argument("--model_config_file", default=d("model_config_file"),
                   help="TF Serving ModelServerConfig text proto (model_config_list); overrides --model_name/--model_base_path")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float,
                   default=d("model_config_file_poll_wait_seconds"),
                   help="re-read --model_config_file this often (default 0: read once)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=d("file_system_poll_wait_seconds"),
                   help="scan model directories for new versions this often (default 1; 0: only at start)")
    p.add_argument("--rest_api_timeout_in_ms", type=_positive_int, default=d("rest_api_timeout_in_ms"),
                   help="deadline of one REST request in milliseconds (default 30000)")
    boolean("rest_api_enable_cors_support", d("rest_api_enable_cors_support"),
            help="answer CORS preflight requests and allow every origin on the REST API (default false)")
    p.add_argument("--rest_api_num_threads", type=_positive_int, default=d("rest_api_num_threads"),
                   help="REST worker threads for the calls that block (all but predict and V2 infer, which "
                        "wait on the event loop; default 4 x CPUs, at least 8; with batching, "
                        f"at least 2 x max_batch_size, up to {MAX_BATCHING_THREADS})")
    p.add_argument("--grpc_max_threads", type=_positive_int, default=d("grpc_max_threads"),
                   help="gRPC worker threads (default 4 x CPUs; with batching, "
                        f"at least 2 x max_batch_size, up to {MAX_BATCHING_THREADS})")
    p.add_argument("--max_request_bytes", type=_positive_int, default=d("max_request_bytes"),
                   help="largest REST body (after gunzip) and gRPC message, in bytes (default 64 MiB)")
    p.add_argument("--drain_seconds", type=float, default=d("drain_seconds"),
                   help="on SIGTERM, wait at most this long for in-flight requests (default 30)")
    boolean("enable_batching", d("enable_batching"),
                   help="batch requests on the server (default false, or true with --batching_parameters_file)")
    p.add_argument("--batching_parameters_file", default=d("batching_parameters_file"),
                   help="TF Serving BatchingParameters text proto (implies --enable_batching unless it is "
                        "given as false)")
    boolean("freeze_graph", d("freeze_graph"),
                   help="run each signature with its variables folded into constants: faster (see "
                        "docs/benchmarks.md), and a second copy of the weights in memory; a signature "
                        "that writes its variables always keeps them (default true)")
    boolean("shared_trunks", d("shared_trunks"),
            help="versions declaring the same frozen trunk load it once and batch through it together; "
                 "each loads only its head (default true; false: every version loads whole)")
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=d("tensorflow_intra_op_parallelism"),
                   help="threads inside one op (default 0: TensorFlow decides)")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=d("tensorflow_inter_op_parallelism"),
                   help="ops run in parallel (default 0: TensorFlow decides)")
    p.add_argument("--tensorflow_session_parallelism", type=int, default=d("tensorflow_session_parallelism"),
                   help="both of the above where they are 0 (default 0: TensorFlow decides)")
    p.add_argument("--tensorflow_cpus", type=int, default=d("tensorflow_cpus"),
                   help="run TensorFlow's compute threads on the last N CPUs this process may use and "
                        "every other thread on the rest (Linux; default 0: no pinning). Pair it with "
                        "--tensorflow_intra_op_parallelism N; on Kubernetes only with exclusive CPUs "
                        "(the static CPU manager policy); see docs/benchmarks.md")
    p.add_argument("--python_switch_interval_micros", type=_positive_int,
                   default=d("python_switch_interval_micros"),
                   help="how long one Python thread may keep the GIL while another waits for it "
                        "(sys.setswitchinterval; default: Python's 5000). 20-100 lets a batch thread "
                        "start its next batch while the gRPC event loop is busy; see docs/benchmarks.md")
    p.add_argument("--grpc_event_loop", choices=EVENT_LOOPS, default=d("grpc_event_loop"),
                   help="event loop of the gRPC server: uvloop (less CPU per call), asyncio, or auto "
                        "(default: uvloop when installed)")
    p.add_argument("--grpc_channel_arguments", type=_channel_arguments, default=d("grpc_channel_arguments"),
                   help="gRPC server arguments, comma-separated key=value (e.g. grpc.max_connection_age_ms=60000"
                        ",grpc.optimization_target=throughput); integers pass as integers (default: none)")
    p.add_argument("--rest_event_loop", choices=EVENT_LOOPS, default=d("rest_event_loop"),
                   help="event loop of the REST server, as --grpc_event_loop (default: uvloop when installed)")
    p.add_argument("--per_process_gpu_memory_fraction", type=float, default=d("per_process_gpu_memory_fraction"),
                   help="cap each GPU at this fraction of its memory, allocated at start (default 0: no cap)")
    p.add_argument("--gpu_memory_limit_mb", type=int, default=d("gpu_memory_limit_mb"),
                   help="cap each GPU at this many MiB instead of a fraction (default 0: no cap)")
    boolean("gpu_memory_growth", d("gpu_memory_growth"),
                   help="without a cap, let GPU memory grow as needed (default true)")
    p.add_argument("--max_image_pixels", type=_positive_int, default=d("max_image_pixels"),
                   help=f"largest encoded image accepted, in pixels (default {d('max_image_pixels')})")
    boolean("enable_metrics", d("enable_metrics"),
                   help="serve Prometheus metrics at /metrics and /monitoring/prometheus/metrics (default true)")
    p.add_argument("--monitoring_config_file", default=d("monitoring_config_file"),
                   help="TF Serving MonitoringConfig text proto: prometheus_config { enable path } chooses "
                        "whether metrics are served and at which path besides /metrics")
    p.add_argument("--auth_token_file", default=d("auth_token_file"),
                   help="require a bearer token from this file (one per line) in the REST Authorization "
                        "header and the gRPC 'authorization' metadata (default: no authentication)")
    boolean("auth_metrics", d("auth_metrics"),
                   help="metrics need the token too (health always stays open; default false)")
    boolean("enable_reload_config_rpc", d("enable_reload_config_rpc"),
                   help="answer ModelService.HandleReloadConfigRequest, which can point the server at any "
                        "directory it can read, and V2's repository load and unload of configured models "
                        "(default true, as TF Serving; false: PERMISSION_DENIED)")
    boolean("enable_model_warmup", d("enable_model_warmup"),
            help="replay each version's assets.extra/tf_serving_warmup_requests before it serves (default true)")
    p.add_argument("--num_request_iterations_for_warmup", type=int, default=d("num_request_iterations_for_warmup"),
                   help="replay each warmup record this many times (default 0: once)")
    p.add_argument("--ssl_config_file", default=d("ssl_config_file"),
                   help="TF Serving SSLConfig text proto: gRPC over TLS, mutual TLS with client_verify")
    p.add_argument("--rest_tls_cert", default=d("rest_tls_cert"),
                   help="PEM certificate chain file: REST over HTTPS (with --rest_tls_key)")
    p.add_argument("--rest_tls_key", default=d("rest_tls_key"), help="PEM private key file of --rest_tls_cert")
    p.add_argument("--log_level", default=d("log_level"), help="logging level (default INFO)")
    p.add_argument("--shadow_fraction", type=float, default=d("shadow_fraction"), metavar="F",
                   help="mirror this fraction (0..1) of the requests 'stable' answers to 'canary' and compare "
                        "the answers at GET /v1/models/{name}/shadow (default 0: off)")
    boolean("version", False, help="print the versions of Graft and TensorFlow, then exit")
    inert = p.add_argument_group(
        "TF Serving flags accepted without effect",
        "Accepted so that TF Serving command lines start Graft unchanged; each one given is logged at "
        "start with the reason it changes nothing here.")
    for name, flag in INERT_FLAGS.items():
        help_text = f"{flag.reason} (TF Serving's default: {flag.tf_serving_default or 'empty'})"
        if flag.kind is bool:
            _add_boolean(inert, name, None, help=help_text)
        else:
            inert.add_argument(f"--{name}", type=flag.kind, default=None, help=help_text)
    return p


def _add_boolean(parser, name: str, default: bool | None, help: str) -> None:
    """``--name`` (true), ``--name=true|false`` (also ``--name false``) and absl's ``--noname`` (false)."""
    parser.add_argument(f"--{name}", type=_bool, nargs="?", const=True, default=default, metavar="true|false",
                        help=help)
    parser.add_argument(f"--no{name}", dest=name, action="store_const", const=False, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)




def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed flags; ValueError when they contradict each other."""
    values = vars(args)
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    inert = {name: values[name] for name in INERT_FLAGS if values.get(name) is not None}
    return ServerConfig(**{k: v for k, v in values.items() if k in names}, inert_flags=inert)


def parse_config(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> ServerConfig:
    """The ServerConfig of a command line; a bad command line exits 2 with a usage message."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def version_text() -> str:
    """What ``--version`` prints, in TF Serving's two lines: Graft's version and TensorFlow's."""
    return f"Graft ModelServer: {_installed('graft')}\nTensorFlow Library: {_installed('tensorflow')}"


def _installed(distribution: str) -> str:
    # The installed package's metadata: no need to import TensorFlow to know its version.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``graft-serve``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TensorFlow reads the variable once: set it before the import. A TensorFlow that is
    # already loaded (main() called inside a program) keeps the setting it has.
    quiet = "tensorflow" not in sys.modules and tflog.quiet_by_default(os.environ)
    try:
        checked = preflight(config)
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 1
    with _tensorflow_logging(quiet):
        # Loads TensorFlow: only once the command line, its files and its ports are known to be good.
        from serving.runtime.server import GraftServer

    server = GraftServer(config)
    previous = {sig: signal.signal(sig, lambda signum, frame: server.request_stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            with _tensorflow_logging(quiet):
                server.start(checked)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot start: %s", exc)
            server.drain_and_stop()
            return 1
        server.wait()
        log.info("signal received")
        server.drain_and_stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _tensorflow_logging(quiet: bool) -> contextlib.AbstractContextManager:
    """Graft's filter on TensorFlow's early log lines where the quiet default applies (serving.runtime.tflog)."""
    if not quiet:
        return contextlib.nullcontext()
    return tflog.filtered_stderr(functools.partial(tflog.keep_line, nvidia_driver=tflog.has_nvidia_driver()))


if __name__ == "__main__":
    raise SystemExit(main())
