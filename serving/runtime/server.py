"""GraftServer: one process serving gRPC and REST over one InferenceService, built from a ServerConfig.

``GraftServer(config)`` wires the core (manager, service, batcher, metrics) to
both protocol servers. :meth:`GraftServer.start` first reads every file the config
names and tries its ports (``serving.runtime.preflight``), and binds both ports
before any model loads, so a bad file or a taken port fails fast. Draining:
readiness turns false at once, new requests get UNAVAILABLE / 503, requests
already admitted finish (bounded by ``drain_seconds``), then everything stops.
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
from starlette.middleware.cors import CORSMiddleware

from serving import devices
from serving.config import BatchingConfig, read_model_config_file
from serving.grpc.server import build_server
from serving.manager import ModelManager
from serving.metrics import ServingMetrics
from serving.rest.app import RestOptions, create_app
from serving.rest.server import RestServer
from serving.runtime.affinity import start_runtime_and_pin
from serving.runtime.auth import AuthInterceptor
from serving.runtime.compat import INERT_FLAGS, inert_message
from serving.runtime.preflight import Preflight, preflight
from serving.runtime.settings import ServerConfig
from serving.runtime.tls import grpc_server_credentials
from serving.servable import servable_loader
from serving import warmup
from serving.service import InferenceService
from serving.shadow import ShadowMirror
from serving.trunks import DEFAULT_EDF_DEADLINE_S, TrunkRegistry

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
        # The shared trunks of this server's versions (--shared_trunks; None when off).
        self.trunks: TrunkRegistry | None = None
        self.shadow: ShadowMirror | None = None
        self._stop = threading.Event()
        self._stop_requested = False
        self._grpc = None
        self._rest = None

    def start(self, checked: Preflight | None = None) -> None:
        """Check the configuration, bind both ports, start the manager and both servers; raise on bad config.

        ``checked``: what :func:`serving.runtime.preflight.preflight` already read for
        this config (graft-serve runs it before importing TensorFlow); read here otherwise.
        """
        config = self.config
        # Bad files, taken ports and impossible CPU splits fail before anything starts.
        checked = checked or preflight(config)
        _log_ignored_flags(config)
        _configure_tensorflow(config)
        _tune_gc()
        _tune_switch_interval(config)
        # Before anything touches a GPU: memory settings only apply to uninitialised devices.
        gpu_devices = devices.configure_gpus(devices.GpuOptions(
            config.gpu_memory_growth, config.per_process_gpu_memory_fraction, config.gpu_memory_limit_mb))
        if checked.cpu_split is not None:
            # After the GPU settings (starting the runtime initialises the devices), and
            # before any other thread starts: those inherit the main thread's CPUs.
            start_runtime_and_pin(checked.cpu_split)
        grpc_threads, rest_threads = handler_threads(config, checked.batching)
        registry = CollectorRegistry() if checked.metrics_paths else None
        metrics = (ServingMetrics(registry, device_memory=devices.memory_reader(gpu_devices))
                   if registry is not None else None)
        if config.shared_trunks:
            # Earliest deadline first orders requests without a deadline as if they had the REST one.
            edf_s = config.rest_api_timeout_in_ms / 1000 if config.rest_api_timeout_in_ms else DEFAULT_EDF_DEADLINE_S
            self.trunks = TrunkRegistry(gpu_devices, freeze=config.freeze_graph, batching=checked.batching,
                                        metrics=metrics, edf_default_s=edf_s)
        self.manager = ModelManager(checked.models, poll_seconds=config.file_system_poll_wait_seconds,
                                    listener=metrics,
                                    servable_loader=(self.trunks.load if self.trunks is not None
                                                     else servable_loader(gpu_devices, config.freeze_graph)),
                                    warmup=self._warmup if config.enable_model_warmup else None)
        # The mirror runs canary work only while the service is not busy (wired before the service exists).
        self.shadow = ShadowMirror(self.manager, config.shadow_fraction, busy=lambda: self.service.busy())
        if metrics is not None:
            metrics.watch_shadow(self.shadow.reports)
        self.service = InferenceService(self.manager, metrics=metrics, batching=checked.batching,
                                        max_image_pixels=config.max_image_pixels,
                                        allow_reload_requests=config.enable_reload_config_rpc,
                                        shadow=self.shadow,
                                        shared_queue=self.trunks.queued_rows if self.trunks is not None else None)
        # Both ports are bound before the first model loads: a port taken since the
        # preflight check still fails before any work.
        self._grpc = build_server(self.service, config.host, config.port, grpc_threads,
                                  config.max_request_bytes,
                                  interceptors=[AuthInterceptor(checked.auth)] if checked.auth is not None else [],
                                  credentials=grpc_server_credentials(checked.ssl) if checked.ssl else None,
                                  event_loop=config.grpc_event_loop,
                                  channel_arguments=config.grpc_channel_arguments)
        rest = self._rest_server(checked, registry, rest_threads) if config.rest_api_port else None
        self.manager.start()
        self.grpc_port = self._grpc.port
        self.grpc_event_loop = self._grpc.event_loop
        self._grpc.start()
        log.info("Running gRPC ModelServer at %s:%d (event loop: %s) ...", config.host, self.grpc_port,
                 self.grpc_event_loop)
        if rest is not None:
            self._rest = rest
            self.rest_port = rest.port
            self.rest_event_loop = rest.event_loop
            self._spawn("graft-rest", rest.serve)
            log.info("Exporting HTTP/REST API at:%s:%d%s (event loop: %s) ...", config.host, self.rest_port,
                     " (HTTPS)" if rest.tls else "", self.rest_event_loop)
        if config.model_config_file and config.model_config_file_poll_wait_seconds > 0:
            self._spawn("graft-config-poller", self._poll_config)

    def _rest_server(self, checked: Preflight, registry: CollectorRegistry | None, threads: int) -> RestServer:
        config = self.config
        app = create_app(self.service, RestOptions(config.max_request_bytes, config.rest_api_timeout_in_ms),
                         metrics_registry=registry, auth=checked.auth, metrics_paths=checked.metrics_paths)
        if config.rest_api_enable_cors_support:
            # Outside authentication: a browser's preflight request carries no token.
            app = CORSMiddleware(app, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
        return RestServer(app, config.host, config.rest_api_port, threads=threads,
                          certfile=config.rest_tls_cert, keyfile=config.rest_tls_key,
                          event_loop=config.rest_event_loop)

    def _warmup(self, servable) -> int:
        # Versions load only after start() has built the service. TF Serving's
        # --num_request_iterations_for_warmup replays the whole file that many times;
        # the count is of every replay.
        return sum(warmup.replay(self.service, servable)
                   for _ in range(max(1, self.config.num_request_iterations_for_warmup)))

    def _spawn(self, name: str, target) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def _poll_config(self) -> None:
        path = self.config.model_config_file
        last = _file_signature(path)
        while not self._stop.wait(self.config.model_config_file_poll_wait_seconds):
            current = _file_signature(path)
            if current == last:
                continue
            last = current
            try:
                configs = read_model_config_file(path)
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
            if self.trunks is not None:
                self.trunks.flush()
            log.info("draining: readiness is off, new requests get UNAVAILABLE")
            drained = self.service.wait_idle(self.config.drain_seconds)
            if not drained:
                log.warning("requests still in flight after %.1fs; stopping anyway", self.config.drain_seconds)
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.stop(grace=1.0)
        if self.shadow is not None:
            self.shadow.close()   # before the manager stops: a running canary is released first
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


def _configure_tensorflow(config: ServerConfig) -> None:
    intra, inter = config.intra_op_threads, config.inter_op_threads
    if not (intra or inter):
        return
    # Only possible before TensorFlow's runtime starts, i.e. before any model loads.
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    log.info("TensorFlow threads: intra_op=%d inter_op=%d",
             tf.config.threading.get_intra_op_parallelism_threads(),
             tf.config.threading.get_inter_op_parallelism_threads())


def _log_ignored_flags(config: ServerConfig) -> None:
    """One line for each flag given that changes nothing here, saying why."""
    for name, value in config.inert_flags:
        log.log(logging.WARNING if INERT_FLAGS[name].warn else logging.INFO, "%s", inert_message(name, value))
    if config.model_config_file and config.model_base_path:
        # As in TF Serving: the file names the models (the container's entrypoint passes both).
        log.info("--model_name and --model_base_path are ignored: --model_config_file names the models")


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
