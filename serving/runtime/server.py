"""GraftServer: one process serving gRPC and REST over one InferenceService, built from a ServerConfig.

``GraftServer(config)`` wires the core (manager, service, batcher, metrics) to
both protocol servers; :meth:`GraftServer.start` reads every file the config
names before any model loads, so a bad file fails fast. Draining: readiness
turns false at once, new requests get UNAVAILABLE / 503, requests already
admitted finish (bounded by ``drain_seconds``), then everything stops.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time

import tensorflow as tf
from prometheus_client import CollectorRegistry

from serving import devices
from serving.config import (
    BatchingConfig,
    read_batching_parameters_file,
    read_model_config_file,
    read_monitoring_config_file,
    single_model_config,
)
from serving.grpc.server import build_server
from serving.manager import ModelManager
from serving.metrics import DEFAULT_METRICS_PATHS, ServingMetrics
from serving.rest.app import RestOptions, create_app
from serving.rest.server import RestServer
from serving.runtime.affinity import split_cpus, start_runtime_and_pin
from serving.runtime.auth import AuthInterceptor, TokenAuth
from serving.runtime.settings import ServerConfig
from serving.runtime.tls import grpc_server_credentials, read_ssl_config
from serving.servable import servable_loader
from serving import warmup
from serving.service import InferenceService

log = logging.getLogger("graft-serve")

GC_GEN0_THRESHOLD = 50_000
MAX_BATCHING_THREADS = 256


class GraftServer:
    """The wired process: manager, service, gRPC and REST servers, config polling, draining."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.grpc_port: int | None = None
        self.grpc_event_loop: str | None = None   # "uvloop" or "asyncio" once started
        self.rest_event_loop: str | None = None
        self.rest_port: int | None = None
        self.manager: ModelManager | None = None
        self.service: InferenceService | None = None
        self._stop = threading.Event()
        self._stop_requested = False
        self._grpc = None
        self._rest = None

    def start(self) -> None:
        """Load the configuration, start the manager and both servers; raise on bad config."""
        config = self.config
        _configure_tensorflow(config)
        _tune_gc()
        _tune_switch_interval(config)
        # Before anything touches a GPU: memory settings only apply to uninitialised devices.
        gpu_devices = devices.configure_gpus(devices.GpuOptions(
            config.gpu_memory_growth, config.per_process_gpu_memory_fraction, config.gpu_memory_limit_mb))
        if config.tensorflow_cpus:
            # After the GPU settings (starting the runtime initialises the devices), and
            # before any other thread starts: those inherit the main thread's CPUs.
            start_runtime_and_pin(split_cpus(config.tensorflow_cpus))
        configs = self._read_configs()
        # Bad files fail before any model loads.
        metrics_paths = metrics_paths_of(config)
        auth = _auth(config, metrics_paths)
        credentials = grpc_server_credentials(read_ssl_config(config.ssl_config_file)) if config.ssl_config_file else None
        batching = batching_config(config)
        grpc_threads, rest_threads = handler_threads(config, batching)
        registry = CollectorRegistry() if metrics_paths else None
        metrics = (ServingMetrics(registry, device_memory=devices.memory_reader(gpu_devices))
                   if registry is not None else None)
        self.manager = ModelManager(configs, poll_seconds=config.file_system_poll_wait_seconds, listener=metrics,
                                    servable_loader=servable_loader(gpu_devices, config.freeze_graph),
                                    warmup=self._warmup)
        self.service = InferenceService(self.manager, metrics=metrics, batching=batching,
                                        max_image_pixels=config.max_image_pixels,
                                        allow_reload_requests=config.enable_reload_config_rpc)
        self.manager.start()
        self._grpc = build_server(self.service, config.host, config.port, grpc_threads,
                                  config.max_request_bytes,
                                  interceptors=[AuthInterceptor(auth)] if auth is not None else [],
                                  credentials=credentials, event_loop=config.grpc_event_loop,
                                  channel_arguments=config.grpc_channel_arguments)
        self.grpc_port = self._grpc.port
        self.grpc_event_loop = self._grpc.event_loop
        self._grpc.start()
        log.info("Running gRPC ModelServer at %s:%d (event loop: %s) ...", config.host, self.grpc_port,
                 self.grpc_event_loop)
        if config.rest_api_port:
            app = create_app(self.service, RestOptions(config.max_request_bytes, config.rest_api_timeout_in_ms),
                             metrics_registry=registry, auth=auth, metrics_paths=metrics_paths)
            self._rest = RestServer(app, config.host, config.rest_api_port, threads=rest_threads,
                                    certfile=config.rest_tls_cert, keyfile=config.rest_tls_key,
                                    event_loop=config.rest_event_loop)
            self.rest_port = self._rest.port
            self.rest_event_loop = self._rest.event_loop
            self._spawn("graft-rest", self._rest.serve)
            log.info("Exporting HTTP/REST API at:%s:%d%s (event loop: %s) ...", config.host, self.rest_port,
                     " (HTTPS)" if self._rest.tls else "", self.rest_event_loop)
        if config.model_config_file and config.model_config_file_poll_wait_seconds > 0:
            self._spawn("graft-config-poller", self._poll_config)

    def _warmup(self, servable) -> int:
        # Versions load only after start() has built the service.
        return warmup.replay(self.service, servable)

    def _spawn(self, name: str, target) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def _read_configs(self):
        if self.config.model_config_file:
            return read_model_config_file(self.config.model_config_file)
        return [single_model_config(self.config.model_name, self.config.model_base_path)]

    def _poll_config(self) -> None:
        path = self.config.model_config_file
        last = _file_signature(path)
        while not self._stop.wait(self.config.model_config_file_poll_wait_seconds):
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

        Returns True when every in-flight request finished within ``drain_seconds``.
        """
        self._stop.set()
        drained = True
        if self.service is not None:
            self.service.begin_drain()
            log.info("draining: readiness is off, new requests get UNAVAILABLE")
            drained = self.service.wait_idle(self.config.drain_seconds)
            if not drained:
                log.warning("requests still in flight after %.1fs; stopping anyway", self.config.drain_seconds)
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.stop(grace=1.0)
        if self.manager is not None:
            self.manager.stop(timeout=max(1.0, self.config.drain_seconds))
        if self.service is not None:
            self.service.close()
        log.info("stopped")
        return drained


def cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def handler_threads(config: ServerConfig, batching: BatchingConfig | None) -> tuple[int, int]:
    """The gRPC and REST worker thread counts: the config's, else derived from the CPUs and batching."""
    # A blocking call waiting for its batch (classify, regress) holds a worker thread, so
    # the worker threads cap the size of those batches (docs/benchmarks.md): two batches'
    # worth lets one run while the next fills.
    floor = min(2 * batching.max_batch_size, MAX_BATCHING_THREADS) if batching is not None else 0
    grpc_threads = config.grpc_max_threads or max(4 * cpus(), floor)
    rest_threads = config.rest_api_num_threads or max(8, 4 * cpus(), floor)
    return grpc_threads, rest_threads


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


def _auth(config: ServerConfig, metrics_paths: tuple[str, ...]) -> TokenAuth | None:
    if not config.auth_token_file:
        return None
    return TokenAuth.from_file(config.auth_token_file, protect_metrics=config.auth_metrics,
                               metrics_paths=metrics_paths)


def _configure_tensorflow(config: ServerConfig) -> None:
    if not (config.tensorflow_intra_op_parallelism or config.tensorflow_inter_op_parallelism):
        return
    # Only possible before TensorFlow's runtime starts, i.e. before any model loads.
    if config.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(config.tensorflow_intra_op_parallelism)
    if config.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(config.tensorflow_inter_op_parallelism)
    log.info("TensorFlow threads: intra_op=%d inter_op=%d",
             tf.config.threading.get_intra_op_parallelism_threads(),
             tf.config.threading.get_inter_op_parallelism_threads())


def _tune_gc() -> None:
    # A served model keeps 10^5-10^6 GC-tracked objects alive (TensorFlow, Keras), and a
    # JSON request of an image parses into thousands of lists: at CPython's default
    # gen-0 threshold that triggers many collections per request, some of them full
    # scans of that heap (docs/benchmarks.md). Cycles are still collected, less often.
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def _tune_switch_interval(config: ServerConfig) -> None:
    # A batch thread gives up the GIL several times per model call and each time may
    # wait a whole switch interval to get it back from a busy event loop. A shorter
    # interval helps gRPC and costs REST (docs/benchmarks.md): a choice for the traffic
    # mix, so a setting, not a default.
    if config.python_switch_interval_micros is None:
        return
    sys.setswitchinterval(config.python_switch_interval_micros / 1e6)
    log.info("Python switch interval: %.0f us", sys.getswitchinterval() * 1e6)


def _file_signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
