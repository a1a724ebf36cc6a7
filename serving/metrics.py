"""Every Prometheus metric of the server, defined once, on a registry the app injects.

Naming follows Prometheus conventions: prefix ``graft_``, counters end in
``_total``, durations are ``_seconds``, sizes ``_bytes``. Families:

=====================================  =========  ==============================================
graft_requests_total                   counter    model, version, signature, method, protocol, code
graft_request_latency_seconds          histogram  model, signature, method, protocol, code
graft_examples_total                   counter    model, version, signature, method
graft_batch_size                       histogram  model, version, signature (real rows, no padding)
graft_batch_padding_rows_total         counter    model, version, signature
graft_batch_queue_delay_seconds        histogram  model, version, signature (per request part)
graft_batch_queue_depth                gauge      model, version, signature (rows waiting)
graft_inference_seconds                histogram  model, version, signature, part, trunk (one run: a batch, or an
                                                  unbatched request; part: model, or a shared trunk's trunk / head)
graft_trunk_batch_size                 histogram  trunk, signature (rows per trunk run)
graft_trunk_batch_models               histogram  trunk, signature (models whose rows one trunk run carried)
graft_trunk_group_size                 gauge      trunk (loaded versions sharing the trunk)
graft_model_version_state              gauge      model, version, state (1 = current state, else 0)
graft_model_load_seconds               histogram  model (successful loads, warmup included)
graft_model_load_failures_total        counter    model
graft_build_info                       info       version, tensorflow_version, python_version
graft_device_memory_bytes              gauge      device (GPU memory in use; no samples without GPUs)
graft_shadow_mirrored_total            counter    model, stable_version, canary_version (and _compared_,
                                                  _dropped_, _canary_errors_total; the current window's
                                                  counts, restarting when a label moves)
graft_shadow_agreement                 gauge      model, stable_version, canary_version (top-1; absent
                                                  before a classifier comparison); also _js_divergence
process_*, python_info, python_gc_*    the prometheus_client process, platform and GC collectors
=====================================  =========  ==============================================

Unlike TF Serving's ``:tensorflow:serving:request_latency`` (successes only),
the latency histogram records every request, failures included, with the gRPC
code name as ``code`` (``OK`` for success), so both "p99 of successes" and
"p99 of everything" can be queried. ``version`` is ``""`` when a request
failed before a version was resolved (e.g. ``NOT_FOUND``), and ``signature``
too when the adapter refused it before the service saw it (a body that is not
JSON, a malformed gRPC message). Request bytes that do not parse as the RPC's
message at all name no model and are not counted.

Shared trunks (``serving.trunks``) are labelled ``trunk`` with
``graft.contract.short_fingerprint``, never the whole hash. A trunk run is an
inference sample with ``part="trunk"`` (model and version empty, the trunk
signature), each head run one with ``part="head"``; whole-version runs are
``part="model"`` with ``trunk`` empty.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
from typing import Callable, Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# Where the REST port serves the registry: the conventional path, and TF Serving's default.
TF_SERVING_METRICS_PATH = "/monitoring/prometheus/metrics"
DEFAULT_METRICS_PATHS: tuple[str, ...] = ("/metrics", TF_SERVING_METRICS_PATH)

# 100 us .. 13.1 s, doubling: sub-millisecond to multi-second at 2x resolution.
LATENCY_BUCKETS: tuple[float, ...] = tuple(round(1e-4 * 2**i, 7) for i in range(18))
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(11))  # 1 .. 1024 rows
LOAD_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# The lifecycle states a version can report (docs/internals.md, manager.py).
VERSION_STATES: tuple[str, ...] = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END", "ERROR")

DeviceMemoryReader = Callable[[], Mapping[str, int]]


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tensorflow_gpu_memory() -> dict[str, int]:
    """Bytes in use on each visible GPU, per TensorFlow; empty without GPUs or before TF is imported.

    Reads only a TensorFlow the process already imported, so a scrape never
    pays for (or triggers) the TensorFlow import.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return {}
    result = {}
    for index, _ in enumerate(tf.config.list_physical_devices("GPU")):
        device = f"GPU:{index}"
        try:
            result[device] = int(tf.config.experimental.get_memory_info(device)["current"])
        except (ValueError, RuntimeError):
            # Not initialised yet (no model placed on it): nothing to report.
            continue
    return result


class _DeviceMemoryCollector:
    """Reports ``graft_device_memory_bytes`` at scrape time; the family has no samples without GPUs."""

    name = "graft_device_memory_bytes"
    doc = "Accelerator memory in use, in bytes, per device."

    def __init__(self, reader: DeviceMemoryReader) -> None:
        self._reader = reader

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Declared without calling the reader, so registering never touches a device.
        return [GaugeMetricFamily(self.name, self.doc, labels=["device"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            readings = self._reader()
        except Exception:  # a failing device query must not break the whole scrape
            log.exception("reading device memory failed")
            return []
        # Without GPUs the family is still exposed, empty, so dashboards and alert
        # rules that name it find it on every node.
        family = GaugeMetricFamily(self.name, self.doc, labels=["device"])
        for device, used in sorted((readings or {}).items()):
            family.add_metric([device], float(used))
        return [family]


ShadowReader = Callable[[], Iterable[Mapping]]
SHADOW_COUNTS: tuple[str, ...] = ("mirrored", "compared", "dropped", "canary_errors")
SHADOW_LABELS: tuple[str, ...] = ("model", "stable_version", "canary_version")


class _ShadowCollector:
    """Reports the shadow windows (``serving.shadow.ShadowMirror.reports``) at scrape time, so the
    metrics and ``GET /v1/models/{name}/shadow`` read the same counts."""

    def __init__(self, reader: ShadowReader) -> None:
        self._reader = reader

    def describe(self) -> Iterable:
        """The families, declared without reading any window."""
        return self._families()

    def collect(self) -> Iterable:
        """One sample per family and current window."""
        families = self._families()
        for report in self._reader():
            labels = [report["model"], str(report["stable"]), str(report["canary"])]
            for family, name in zip(families, SHADOW_COUNTS):
                family.add_metric(labels, float(report[name]))
            for family, name in zip(families[len(SHADOW_COUNTS):], ("agreement", "js_divergence")):
                if report[name] is not None:
                    family.add_metric(labels, float(report[name]))
        return families

    @staticmethod
    def _families() -> list:
        counts = [CounterMetricFamily(f"graft_shadow_{name}", f"Shadow evaluation: {name.replace('_', ' ')} "
                                      "requests in the current window.", labels=SHADOW_LABELS)
                  for name in SHADOW_COUNTS]
        return counts + [
            GaugeMetricFamily("graft_shadow_agreement", "Shadow evaluation: top-1 agreement of canary with "
                              "stable in the current window.", labels=SHADOW_LABELS),
            GaugeMetricFamily("graft_shadow_js_divergence", "Shadow evaluation: Jensen-Shannon divergence "
                              "(bits) of the two predicted-class histograms.", labels=SHADOW_LABELS)]


class BatchMetrics:
    """A ``BatchObserver`` bound to one (model, version, signature)."""

    def __init__(self, metrics: "ServingMetrics", model: str, version: str, signature: str) -> None:
        labels = (model, version, signature)
        # Children resolved once: the batcher calls these on its hot path.
        self._size = metrics.batch_size.labels(*labels)
        self._padding = metrics.batch_padding_rows.labels(*labels)
        self._delay = metrics.batch_queue_delay.labels(*labels)
        self._depth = metrics.batch_queue_depth.labels(*labels)
        self._inference = metrics.inference_seconds.labels(*labels, "model", "")

    def on_batch(self, size: int, padded_size: int, queue_delays: list[float], run_seconds: float) -> None:
        """Record one batch: its real rows, padding, each part's queueing delay and the run time."""
        self._size.observe(size)
        if padded_size > size:
            self._padding.inc(padded_size - size)
        for delay in queue_delays:
            self._delay.observe(delay)
        self._inference.observe(run_seconds)

    def on_queue_depth(self, depth: int) -> None:
        """Record the rows now waiting in the queue."""
        self._depth.set(depth)


class ServingMetrics:
    """All of the server's metrics, registered on ``registry`` (never the global default).

    Also a ``ManagerListener`` (``on_state``, ``on_load``, ``on_unload``) for
    version lifecycle metrics. ``device_memory`` reads GPU memory per device at
    scrape time (default: TensorFlow's view; tests inject their own).
    """

    def __init__(self, registry: CollectorRegistry, *, device_memory: DeviceMemoryReader | None = None) -> None:
        self.registry = registry
        self.requests = Counter(
            "graft_requests_total", "Requests answered, by outcome (gRPC code name).",
            ["model", "version", "signature", "method", "protocol", "code"], registry=registry)
        self.request_latency = Histogram(
            "graft_request_latency_seconds",
            "Time from request decoded to response ready, failures included.",
            ["model", "signature", "method", "protocol", "code"], buckets=LATENCY_BUCKETS, registry=registry)
        self.examples = Counter(
            "graft_examples_total", "Examples (rows, e.g. images) served successfully.",
            ["model", "version", "signature", "method"], registry=registry)
        batch_labels = ["model", "version", "signature"]
        self.batch_size = Histogram(
            "graft_batch_size", "Rows per executed batch, before padding.",
            batch_labels, buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_padding_rows = Counter(
            "graft_batch_padding_rows_total", "Padding rows added to reach an allowed batch size.",
            batch_labels, registry=registry)
        self.batch_queue_delay = Histogram(
            "graft_batch_queue_delay_seconds", "Time a request (or part of a split one) waited for its batch to start.",
            batch_labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_queue_depth = Gauge(
            "graft_batch_queue_depth", "Rows waiting in the batch queue, not yet running.",
            batch_labels, registry=registry)
        self.inference_seconds = Histogram(
            "graft_inference_seconds", "Model run time per batch, or per request run without a batcher "
            "(device time, padding included); part: a whole model, or a shared trunk's trunk or head.",
            [*batch_labels, "part", "trunk"], buckets=LATENCY_BUCKETS, registry=registry)
        self.trunk_batch_size = Histogram(
            "graft_trunk_batch_size", "Rows per run of a shared trunk (every model's rows together).",
            ["trunk", "signature"], buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.trunk_batch_models = Histogram(
            "graft_trunk_batch_models", "Models whose rows one run of a shared trunk carried.",
            ["trunk", "signature"], buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.trunk_group_size = Gauge(
            "graft_trunk_group_size", "Loaded model versions sharing one trunk.", ["trunk"], registry=registry)
        self.version_state = Gauge(
            "graft_model_version_state", "1 for the state a model version is in, 0 for the others.",
            ["model", "version", "state"], registry=registry)
        self.load_seconds = Histogram(
            "graft_model_load_seconds", "Time to load and warm up a model version (successful loads).",
            ["model"], buckets=LOAD_BUCKETS, registry=registry)
        self.load_failures = Counter(
            "graft_model_load_failures_total", "Model version loads that failed.", ["model"], registry=registry)
        self.build_info = Info("graft_build", "Graft build and runtime versions.", registry=registry)
        self.build_info.info({
            "version": _dist_version("graft"),
            "tensorflow_version": _dist_version("tensorflow"),
            "python_version": platform.python_version(),
        })
        registry.register(_DeviceMemoryCollector(device_memory or tensorflow_gpu_memory))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._request_children: dict[tuple, tuple] = {}
        self._example_children: dict[tuple, Counter] = {}
        self._inference_children: dict[tuple, Histogram] = {}
        self._batch_labels: set[tuple[str, str, str]] = set()

    # -- requests (called by the service) ------------------------------------

    def observe_request(self, model: str, version: int | str | None, signature: str, method: str,
                        protocol: str, code: str, seconds: float) -> None:
        """Count one answered request and record its latency (``code``: gRPC code name, ``OK`` on success)."""
        key = (model, "" if version is None else str(version), signature, method, protocol, code)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(*key),
                        self.request_latency.labels(model, signature, method, protocol, code))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_examples(self, model: str, version: int | str, signature: str, method: str, count: int) -> None:
        """Count ``count`` examples (rows) served successfully."""
        key = (model, str(version), signature, method)
        child = self._example_children.get(key)
        if child is None:
            child = self._example_children[key] = self.examples.labels(*key)
        child.inc(count)

    def observe_inference(self, model: str, version: int | str, signature: str, seconds: float,
                          part: str = "model", trunk: str = "") -> None:
        """Record one model run made without a batcher (batching off, or a signature it cannot batch),
        or one run of a shared trunk's ``part`` ("trunk" or "head"; ``trunk``: its short fingerprint)."""
        key = (model, str(version), signature, part, trunk)
        child = self._inference_children.get(key)
        if child is None:
            child = self._inference_children[key] = self.inference_seconds.labels(*key)
        child.observe(seconds)

    def observe_trunk_batch(self, trunk: str, signature: str, rows: int, models: int) -> None:
        """Record one shared trunk run: its rows and how many models they came from."""
        self.trunk_batch_size.labels(trunk, signature).observe(rows)
        self.trunk_batch_models.labels(trunk, signature).observe(models)

    def set_trunk_group_size(self, trunk: str, size: int) -> None:
        """Set a trunk's group size; an unloaded trunk's series goes away."""
        if size:
            self.trunk_group_size.labels(trunk).set(size)
        else:
            try:
                self.trunk_group_size.remove(trunk)
            except KeyError:  # never set
                pass

    def batch_observer(self, model: str, version: int | str, signature: str) -> BatchMetrics:
        """A ``BatchObserver`` for the batcher of one (model, version, signature)."""
        self._batch_labels.add((model, str(version), signature))
        return BatchMetrics(self, model, str(version), signature)

    # -- ManagerListener ------------------------------------------------------

    def on_state(self, name: str, version: int, state) -> None:
        """Set the version's state gauge: 1 for ``state`` (a VersionState or its name), 0 for the rest."""
        current = str(getattr(state, "name", state)).upper()
        states = VERSION_STATES if current in VERSION_STATES else (*VERSION_STATES, current)
        for candidate in states:
            self.version_state.labels(name, str(version), candidate).set(1 if candidate == current else 0)

    def on_load(self, name: str, version: int, seconds: float, error: str | None) -> None:
        """Record a finished load: its duration when it succeeded, a failure otherwise."""
        if error is None:
            self.load_seconds.labels(name).observe(seconds)
        else:
            self.load_failures.labels(name).inc()

    def on_unload(self, name: str, version: int) -> None:
        """Drop the unloaded version's queue-depth gauge, which would otherwise go stale."""
        prefix = (name, str(version))
        for labels in [k for k in self._batch_labels if k[:2] == prefix]:
            self._batch_labels.discard(labels)
            try:
                self.batch_queue_depth.remove(*labels)
            except KeyError:  # never set
                pass

    # -- exposition -----------------------------------------------------------

    def watch_shadow(self, reader: ShadowReader) -> None:
        """Expose the shadow windows ``reader`` returns (each a report with its ``model``) at scrape time."""
        self.registry.register(_ShadowCollector(reader))

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, with its content type (for ``/metrics``)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
