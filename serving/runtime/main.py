"""graft-serve's command line: TF Serving's flags -> a ServerConfig -> a running GraftServer.

Flags use TF Serving's names and defaults (``--port``, ``--rest_api_port``,
``--model_config_file`` ...), including its ``--flag=true/false`` booleans. The
parser and the config are free of TensorFlow, so ``--help`` and usage errors
answer at once; TensorFlow loads only when the server is built.
SIGTERM / SIGINT drain instead of dropping work (``GraftServer.drain_and_stop``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
from collections.abc import Sequence

from serving.runtime.loop import EVENT_LOOPS
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
        prog="graft-serve",
        description="Serve versioned TensorFlow SavedModels over TF-Serving-compatible gRPC and REST.")
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
    p.add_argument("--enable_batching", type=_bool, nargs="?", const=True, default=d("enable_batching"),
                   help="batch requests on the server (default false, or true with --batching_parameters_file)")
    p.add_argument("--batching_parameters_file", default=d("batching_parameters_file"),
                   help="TF Serving BatchingParameters text proto (implies --enable_batching unless it is "
                        "given as false)")
    p.add_argument("--freeze_graph", type=_bool, nargs="?", const=True, default=d("freeze_graph"),
                   help="run each signature with its variables folded into constants: faster (see "
                        "docs/benchmarks.md), and a second copy of the weights in memory; a signature "
                        "that writes its variables always keeps them (default true)")
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=d("tensorflow_intra_op_parallelism"),
                   help="threads inside one op (default 0: TensorFlow decides)")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=d("tensorflow_inter_op_parallelism"),
                   help="ops run in parallel (default 0: TensorFlow decides)")
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
    p.add_argument("--gpu_memory_growth", type=_bool, nargs="?", const=True, default=d("gpu_memory_growth"),
                   help="without a cap, let GPU memory grow as needed (default true)")
    p.add_argument("--max_image_pixels", type=_positive_int, default=d("max_image_pixels"),
                   help=f"largest encoded image accepted, in pixels (default {d('max_image_pixels')})")
    p.add_argument("--enable_metrics", type=_bool, nargs="?", const=True, default=d("enable_metrics"),
                   help="serve Prometheus metrics at /metrics and /monitoring/prometheus/metrics (default true)")
    p.add_argument("--monitoring_config_file", default=d("monitoring_config_file"),
                   help="TF Serving MonitoringConfig text proto: prometheus_config { enable path } chooses "
                        "whether metrics are served and at which path besides /metrics")
    p.add_argument("--auth_token_file", default=d("auth_token_file"),
                   help="require a bearer token from this file (one per line) in the REST Authorization "
                        "header and the gRPC 'authorization' metadata (default: no authentication)")
    p.add_argument("--auth_metrics", type=_bool, nargs="?", const=True, default=d("auth_metrics"),
                   help="metrics need the token too (health always stays open; default false)")
    p.add_argument("--enable_reload_config_rpc", type=_bool, nargs="?", const=True,
                   default=d("enable_reload_config_rpc"),
                   help="answer ModelService.HandleReloadConfigRequest, which can point the server at any "
                        "directory it can read (default true, as TF Serving; false: PERMISSION_DENIED)")
    p.add_argument("--ssl_config_file", default=d("ssl_config_file"),
                   help="TF Serving SSLConfig text proto: gRPC over TLS, mutual TLS with client_verify")
    p.add_argument("--rest_tls_cert", default=d("rest_tls_cert"),
                   help="PEM certificate chain file: REST over HTTPS (with --rest_tls_key)")
    p.add_argument("--rest_tls_key", default=d("rest_tls_key"), help="PEM private key file of --rest_tls_cert")
    p.add_argument("--log_level", default=d("log_level"), help="logging level (default INFO)")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed flags; ValueError when they contradict each other."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    return ServerConfig(**{k: v for k, v in vars(args).items() if k in names})


def parse_config(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> ServerConfig:
    """The ServerConfig of a command line; a bad command line exits 2 with a usage message."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``graft-serve``; returns the process exit code."""
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Loads TensorFlow: only once the command line is known to be good.
    from serving.runtime.server import GraftServer

    server = GraftServer(config)
    previous = {sig: signal.signal(sig, lambda signum, frame: server.request_stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
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


if __name__ == "__main__":
    raise SystemExit(main())
