"""graft-serve: one process serving gRPC and REST over one InferenceService.

Flags use TF Serving's names and defaults (``--port``, ``--rest_api_port``,
``--model_config_file`` ...), including its ``--flag=true/false`` booleans.
SIGTERM / SIGINT drain instead of dropping work: readiness turns false at once,
new requests get UNAVAILABLE / 503, requests already admitted finish (bounded by
``--drain_seconds``), then the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from serving.loop import EVENT_LOOPS  # asyncio only: the parser stays free of TensorFlow

log = logging.getLogger("graft-serve")

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_DRAIN_SECONDS = 30.0
GC_GEN0_THRESHOLD = 50_000
MAX_BATCHING_THREADS = 256


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


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


def _channel_arguments(text: str) -> list[tuple[str, int | str]]:
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
    return arguments


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (TF Serving's flag names and defaults where it has them)."""
    from serving.service import DEFAULT_MAX_IMAGE_PIXELS

    p = argparse.ArgumentParser(
        prog="graft-serve",
        description="Serve versioned TensorFlow SavedModels over TF-Serving-compatible gRPC and REST.")
    p.add_argument("--port", type=_port, default=8500, help="gRPC port (default 8500; 0 picks a free one)")
    p.add_argument("--rest_api_port", type=_port, default=8501, help="REST port (default 8501; 0 disables REST)")
    p.add_argument("--host", default="0.0.0.0", help="bind address for both servers (default 0.0.0.0)")
    p.add_argument("--model_name", default="default", help="model name with --model_base_path (default 'default')")
    p.add_argument("--model_base_path", default="", help="directory holding the model's version directories")
    p.add_argument("--model_config_file", default="",
                   help="TF Serving ModelServerConfig text proto (model_config_list); overrides --model_name/--model_base_path")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                   help="re-read --model_config_file this often (default 0: read once)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="scan model directories for new versions this often (default 1; 0: only at start)")
    p.add_argument("--rest_api_timeout_in_ms", type=_positive_int, default=30000,
                   help="deadline of one REST request in milliseconds (default 30000)")
    p.add_argument("--rest_api_num_threads", type=_positive_int, default=None,
                   help="REST worker threads for the calls that block (all but predict and V2 infer, which "
                        "wait on the event loop; default 4 x CPUs, at least 8; with batching, "
                        f"at least 2 x max_batch_size, up to {MAX_BATCHING_THREADS})")
    p.add_argument("--grpc_max_threads", type=_positive_int, default=None,
                   help="gRPC worker threads (default 4 x CPUs; with batching, "
                        f"at least 2 x max_batch_size, up to {MAX_BATCHING_THREADS})")
    p.add_argument("--max_request_bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest REST body (after gunzip) and gRPC message, in bytes (default 64 MiB)")
    p.add_argument("--drain_seconds", type=float, default=DEFAULT_DRAIN_SECONDS,
                   help="on SIGTERM, wait at most this long for in-flight requests (default 30)")
    p.add_argument("--enable_batching", type=_bool, nargs="?", const=True, default=None,
                   help="batch requests on the server (default false, or true with --batching_parameters_file)")
    p.add_argument("--batching_parameters_file", default="",
                   help="TF Serving BatchingParameters text proto (implies --enable_batching unless it is "
                        "given as false)")
    p.add_argument("--freeze_graph", type=_bool, nargs="?", const=True, default=True,
                   help="run each signature with its variables folded into constants: 1.4-1.6x faster "
                        "on the benchmark model, and a second copy of the weights in memory; a signature "
                        "that writes its variables always keeps them (default true)")
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                   help="threads inside one op (default 0: TensorFlow decides)")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                   help="ops run in parallel (default 0: TensorFlow decides)")
    p.add_argument("--tensorflow_cpus", type=int, default=0,
                   help="run TensorFlow's compute threads on the last N CPUs this process may use and "
                        "every other thread on the rest (Linux; default 0: no pinning). Pair it with "
                        "--tensorflow_intra_op_parallelism N; on Kubernetes only with exclusive CPUs "
                        "(the static CPU manager policy); see docs/benchmarks.md")
    p.add_argument("--python_switch_interval_micros", type=_positive_int, default=None,
                   help="how long one Python thread may keep the GIL while another waits for it "
                        "(sys.setswitchinterval; default: Python's 5000). 20-100 lets a batch thread "
                        "start its next batch while the gRPC event loop is busy; see docs/benchmarks.md")
    p.add_argument("--grpc_event_loop", choices=EVENT_LOOPS, default="auto",
                   help="event loop of the gRPC server: uvloop (less CPU per call), asyncio, or auto "
                        "(default: uvloop when installed)")
    p.add_argument("--grpc_channel_arguments", type=_channel_arguments, default=[],
                   help="gRPC server arguments, comma-separated key=value (e.g. grpc.max_connection_age_ms=60000"
                        ",grpc.optimization_target=throughput); integers pass as integers (default: none)")
    p.add_argument("--rest_event_loop", choices=EVENT_LOOPS, default="auto",
                   help="event loop of the REST server, as --grpc_event_loop (default: uvloop when installed)")
    p.add_argument("--per_process_gpu_memory_fraction", type=float, default=0.0,
                   help="cap each GPU at this fraction of its memory, allocated at start (default 0: no cap)")
    p.add_argument("--gpu_memory_limit_mb", type=int, default=0,
                   help="cap each GPU at this many MiB instead of a fraction (default 0: no cap)")
    p.add_argument("--gpu_memory_growth", type=_bool, nargs="?", const=True, default=True,
                   help="without a cap, let GPU memory grow as needed (default true)")
    p.add_argument("--max_image_pixels", type=_positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"largest encoded image accepted, in pixels (default {DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--enable_metrics", type=_bool, nargs="?", const=True, default=True,
                   help="serve Prometheus metrics at /metrics and /monitoring/prometheus/metrics (default true)")
    p.add_argument("--monitoring_config_file", default="",
                   help="TF Serving MonitoringConfig text proto: prometheus_config { enable path } chooses "
                        "whether metrics are served and at which path besides /metrics")
    p.add_argument("--auth_token_file", default="",
                   help="require a bearer token from this file (one per line) in the REST Authorization "
                        "header and the gRPC 'authorization' metadata (default: no authentication)")
    p.add_argument("--auth_metrics", type=_bool, nargs="?", const=True, default=False,
                   help="metrics need the token too (health always stays open; default false)")
    p.add_argument("--enable_reload_config_rpc", type=_bool, nargs="?", const=True, default=True,
                   help="answer ModelService.HandleReloadConfigRequest, which can point the server at any "
                        "directory it can read (default true, as TF Serving; false: PERMISSION_DENIED)")
    p.add_argument("--ssl_config_file", default="",
                   help="TF Serving SSLConfig text proto: gRPC over TLS, mutual TLS with client_verify")
    p.add_argument("--rest_tls_cert", default="",
                   help="PEM certificate chain file: REST over HTTPS (with --rest_tls_key)")
    p.add_argument("--rest_tls_key", default="", help="PEM private key file of --rest_tls_cert")
    p.add_argument("--log_level", default="INFO", help="logging level (default INFO)")
    return p


class GraftServer:
    """The wired process: manager, service, gRPC and REST servers, config polling, draining."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.grpc_port: int | None = None
        self.grpc_event_loop: str | None = None   # "uvloop" or "asyncio" once started
        self.rest_event_loop: str | None = None
        self.rest_port: int | None = None
        self._stop = threading.Event()
        self._stop_requested = False
        self._grpc = None
        self._rest = None

    def start(self) -> None:
        """Load the configuration, start the manager and both servers; raise on bad config."""
        args = self.args
        _configure_tensorflow(args)
        _tune_gc()
        _tune_switch_interval(args)
        from serving import devices

        # Before anything touches a GPU: memory settings only apply to uninitialised devices.
        gpu_devices = devices.configure_gpus(devices.GpuOptions(
            args.gpu_memory_growth, args.per_process_gpu_memory_fraction, args.gpu_memory_limit_mb))
        if args.tensorflow_cpus:
            from serving.affinity import split_cpus, start_runtime_and_pin

            # After the GPU settings (starting the runtime initialises the devices), and
            # before any other thread starts: those inherit the main thread's CPUs.
            start_runtime_and_pin(split_cpus(args.tensorflow_cpus))
        from prometheus_client import CollectorRegistry

        from serving.grpc_api import build_server
        from serving.manager import ModelManager
        from serving.metrics import ServingMetrics
        from serving.rest import RestOptions, create_app
        from serving.service import InferenceService

        configs = self._read_configs()
        # Bad files fail before any model loads.
        metrics_paths = _metrics_paths(args)
        auth, credentials = _auth(args, metrics_paths), _grpc_credentials(args)
        batching = _batching_config(args)
        _handler_threads(args, batching)
        registry = CollectorRegistry() if metrics_paths else None
        metrics = (ServingMetrics(registry, device_memory=devices.memory_reader(gpu_devices))
                   if registry is not None else None)
        self.manager = ModelManager(configs, poll_seconds=args.file_system_poll_wait_seconds, listener=metrics,
                                    servable_loader=devices.servable_loader(gpu_devices, args.freeze_graph))
        self.service = InferenceService(self.manager, metrics=metrics, batching=batching,
                                        max_image_pixels=args.max_image_pixels,
                                        allow_reload_requests=args.enable_reload_config_rpc)
        self.manager.start()
        self._grpc = build_server(self.service, args.host, args.port, args.grpc_max_threads,
                                  args.max_request_bytes, interceptors=_interceptors(auth),
                                  credentials=credentials, event_loop=args.grpc_event_loop,
                                  channel_arguments=args.grpc_channel_arguments)
        self.grpc_port = self._grpc.port
        self.grpc_event_loop = self._grpc.event_loop
        self._grpc.start()
        log.info("Running gRPC ModelServer at %s:%d (event loop: %s) ...", args.host, self.grpc_port,
                 self.grpc_event_loop)
        if args.rest_api_port:
            from serving.asgi import RestServer

            app = create_app(self.service, RestOptions(args.max_request_bytes, args.rest_api_timeout_in_ms),
                             metrics_registry=registry, auth=auth, metrics_paths=metrics_paths)
            self._rest = RestServer(app, args.host, args.rest_api_port, threads=args.rest_api_num_threads,
                                    certfile=args.rest_tls_cert, keyfile=args.rest_tls_key,
                                    event_loop=args.rest_event_loop)
            self.rest_port = self._rest.port
            self.rest_event_loop = self._rest.event_loop
            self._spawn("graft-rest", self._rest.serve)
            log.info("Exporting HTTP/REST API at:%s:%d%s (event loop: %s) ...", args.host, self.rest_port,
                     " (HTTPS)" if self._rest.tls else "", self.rest_event_loop)
        if args.model_config_file and args.model_config_file_poll_wait_seconds > 0:
            self._spawn("graft-config-poller", self._poll_config)

    def _spawn(self, name: str, target) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def _read_configs(self):
        from serving.config import read_model_config_file, single_model_config

        if self.args.model_config_file:
            return read_model_config_file(self.args.model_config_file)
        return [single_model_config(self.args.model_name, self.args.model_base_path)]

    def _poll_config(self) -> None:
        path = self.args.model_config_file
        last = _file_signature(path)
        while not self._stop.wait(self.args.model_config_file_poll_wait_seconds):
            current = _file_signature(path)
            if current == last:
                continue
            last = current
            try:
                configs = self._read_configs()
            except (OSError, ValueError) as exc:
                log.error("keeping the current models: %s", exc)
                continue
            log.info("model config file changed; serving %s", ", ".join(c.name for c in configs))
            self.service.reload_config(configs)

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return; safe from a signal handler (takes no lock)."""
        self._stop_requested = True

    def wait(self) -> None:
        """Block until :meth:`request_stop` is called."""
        # Polling a plain flag, not Event.wait: a signal handler that set an Event could
        # deadlock on the Event's lock if it interrupted this thread inside wait().
        while not self._stop_requested:
            time.sleep(0.05)

    def drain_and_stop(self) -> bool:
        """Refuse new work, let admitted requests finish (bounded), stop everything.

        Returns True when every in-flight request finished within ``--drain_seconds``.
        """
        self._stop.set()
        self.service.begin_drain()
        log.info("draining: readiness is off, new requests get UNAVAILABLE")
        drained = self.service.wait_idle(self.args.drain_seconds)
        if not drained:
            log.warning("requests still in flight after %.1fs; stopping anyway", self.args.drain_seconds)
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.stop(grace=1.0)
        self.manager.stop(timeout=max(1.0, self.args.drain_seconds))
        self.service.close()
        log.info("stopped")
        return drained


def _configure_tensorflow(args: argparse.Namespace) -> None:
    if not (args.tensorflow_intra_op_parallelism or args.tensorflow_inter_op_parallelism):
        return
    import tensorflow as tf

    # Only possible before TensorFlow's runtime starts, i.e. before any model loads.
    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)
    log.info("TensorFlow threads: intra_op=%d inter_op=%d",
             tf.config.threading.get_intra_op_parallelism_threads(),
             tf.config.threading.get_inter_op_parallelism_threads())


def _metrics_paths(args: argparse.Namespace) -> tuple[str, ...]:
    """The REST paths that serve metrics (none: no registry at all)."""
    from serving.metrics import DEFAULT_METRICS_PATHS, metrics_paths_from_monitoring_config

    if not args.enable_metrics:
        return ()
    if not args.monitoring_config_file:
        return DEFAULT_METRICS_PATHS
    text = Path(args.monitoring_config_file).read_text(encoding="utf-8")
    try:
        return metrics_paths_from_monitoring_config(text)
    except ValueError as exc:
        raise ValueError(f"--monitoring_config_file {args.monitoring_config_file}: {exc}") from None


def _auth(args: argparse.Namespace, metrics_paths: tuple[str, ...]):
    if not args.auth_token_file:
        return None
    from serving.auth import TokenAuth

    return TokenAuth.from_file(args.auth_token_file, protect_metrics=args.auth_metrics,
                               metrics_paths=metrics_paths)


def _interceptors(auth) -> list:
    if auth is None:
        return []
    from serving.auth import AuthInterceptor

    return [AuthInterceptor(auth)]


def _grpc_credentials(args: argparse.Namespace):
    if not args.ssl_config_file:
        return None
    from serving.tls import grpc_server_credentials, read_ssl_config

    return grpc_server_credentials(read_ssl_config(args.ssl_config_file))


def _handler_threads(args: argparse.Namespace, batching) -> None:
    """Fill in the REST and gRPC thread counts left at their defaults."""
    # A blocking call waiting for its batch (classify, regress) holds a worker thread,
    # so the worker threads cap the size of those batches: when Predict still blocked,
    # 4 x CPUs (8 on 2 cores) kept batches at ~4 rows and gRPC served half as much
    # (docs/benchmarks.md). Two batches' worth lets one run while the next fills.
    floor = min(2 * batching.max_batch_size, MAX_BATCHING_THREADS) if batching is not None else 0
    if args.grpc_max_threads is None:
        args.grpc_max_threads = max(4 * _cpus(), floor)
    if args.rest_api_num_threads is None:
        args.rest_api_num_threads = max(8, 4 * _cpus(), floor)


def _tune_gc() -> None:
    # A served model keeps ~10^5-10^6 GC-tracked objects alive (TensorFlow, Keras), and one
    # JSON request of a 96x96 image parses into ~10^4 lists. With CPython's default gen-0
    # threshold (700) that triggers a dozen collections per request, some of them full
    # scans of that heap: 20 ms per request instead of 2 (docs/benchmarks.md). Garbage
    # cycles are still collected, after 50,000 allocations instead of 700.
    import gc

    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def _tune_switch_interval(args: argparse.Namespace) -> None:
    # A batch thread gives up the GIL several times per model call (converting the
    # batch to a tensor, running it) and each time may wait a whole switch interval
    # to get it back from an event loop busy with the previous batch's responses.
    # At 5 ms that left the model idle a quarter of the time at C=32; at 20-100 us
    # gRPC served 1.2-1.25x more, and REST with its many handler threads ~0.8x
    # (docs/benchmarks.md): a choice for the traffic mix, so a flag, not a default.
    if args.python_switch_interval_micros is None:
        return
    sys.setswitchinterval(args.python_switch_interval_micros / 1e6)
    log.info("Python switch interval: %.0f us", sys.getswitchinterval() * 1e6)


def _batching_config(args: argparse.Namespace):
    enabled = args.enable_batching
    if enabled is None:  # not given: a parameters file alone turns batching on
        enabled = bool(args.batching_parameters_file)
    if not enabled:
        if args.batching_parameters_file:
            log.warning("--batching_parameters_file %s is ignored: --enable_batching is false",
                        args.batching_parameters_file)
        return None
    from serving.batching import BatchingConfig, read_batching_parameters_file

    if args.batching_parameters_file:
        return read_batching_parameters_file(args.batching_parameters_file)
    return BatchingConfig()


def _file_signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``graft-serve``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        parser.error("either --model_config_file or --model_base_path is required")
    if bool(args.rest_tls_cert) != bool(args.rest_tls_key):
        parser.error("--rest_tls_cert and --rest_tls_key go together")
    if args.auth_metrics and not args.auth_token_file:
        parser.error("--auth_metrics needs --auth_token_file")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = GraftServer(args)
    previous = {sig: signal.signal(sig, lambda signum, frame: server.request_stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot start: %s", exc)
            if getattr(server, "service", None) is not None:
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
