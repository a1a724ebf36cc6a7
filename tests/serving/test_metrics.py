"""Tests of serving.metrics: known traffic through ServingMetrics and a real Batcher,
read back by parsing the exposition text with prometheus_client.parser."""

from __future__ import annotations

import importlib.metadata
import platform
import threading
import time

import numpy as np
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from serving.batching import Batcher, BatchingConfig
from serving.errors import ServingError
from serving.metrics import LATENCY_BUCKETS, ServingMetrics

MODEL, VERSION, SIGNATURE = "digits", 3, "serving_default"

EXPECTED_FAMILIES = {
    "graft_requests": "counter",
    "graft_request_latency_seconds": "histogram",
    "graft_examples": "counter",
    "graft_batch_size": "histogram",
    "graft_batch_padding_rows": "counter",
    "graft_batch_queue_delay_seconds": "histogram",
    "graft_batch_queue_depth": "gauge",
    "graft_inference_seconds": "histogram",
    "graft_model_version_state": "gauge",
    "graft_model_load_seconds": "histogram",
    "graft_model_load_failures": "counter",
    "graft_build_info": "gauge",
    "graft_device_memory_bytes": "gauge",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "python_info": "gauge",
}


def scrape(metrics: ServingMetrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict, family: str, sample: str, **labels) -> float:
    """The value of the one sample named ``sample`` whose labels include ``labels`` (0 if absent)."""
    found = [s.value for s in families[family].samples
             if s.name == sample and all(s.labels.get(k) == str(v) for k, v in labels.items())]
    assert len(found) <= 1, f"{sample} {labels} is ambiguous"
    return found[0] if found else 0.0


class Served:
    """What the service does around a batcher: time, submit, record outcome and examples."""

    def __init__(self, metrics: ServingMetrics, batcher: Batcher):
        self.metrics = metrics
        self.batcher = batcher

    def predict(self, x: np.ndarray, protocol: str) -> dict | ServingError:
        start = time.perf_counter()
        try:
            out = self.batcher.submit({"x": x})
        except ServingError as err:
            self.metrics.observe_request(MODEL, VERSION, SIGNATURE, "predict", protocol, err.code,
                                         time.perf_counter() - start)
            return err
        self.metrics.observe_request(MODEL, VERSION, SIGNATURE, "predict", protocol, "OK",
                                     time.perf_counter() - start)
        self.metrics.observe_examples(MODEL, VERSION, SIGNATURE, "predict", len(x))
        return out


def test_known_traffic_moves_every_family_by_the_expected_amount():
    metrics = ServingMetrics(CollectorRegistry(), device_memory=lambda: {"GPU:0": 4096, "GPU:1": 0})
    gate, entered = threading.Event(), threading.Event()

    def run(inputs):
        if not entered.is_set():
            entered.set()
            assert gate.wait(10)
        return {"y": inputs["x"] * 2.0}

    batcher = Batcher(run, BatchingConfig(max_batch_size=4, allowed_batch_sizes=(2, 4), num_batch_threads=1),
                      observer=metrics.batch_observer(MODEL, VERSION, SIGNATURE))
    served = Served(metrics, batcher)
    results: dict[str, object] = {}

    def call(key, x):
        results[key] = served.predict(x, "grpc")

    try:
        # A runs alone (1 row, padded to 2) and holds the only batch thread; meanwhile
        # B (1 row) and C (2 rows) queue as one batch of 3 rows, padded to 4.
        threads = [threading.Thread(target=call, args=("a", np.full((1, 2), 1.0)))]
        threads[0].start()
        assert entered.wait(5)
        for key, x in (("b", np.full((1, 2), 2.0)), ("c", np.full((2, 2), 3.0))):
            threads.append(threading.Thread(target=call, args=(key, x)))
            threads[-1].start()
            target = 1 if key == "b" else 3
            end = time.monotonic() + 5
            while batcher.queue_depth() != target:
                assert time.monotonic() < end
                time.sleep(0.001)
        depth_while_queued = value(scrape(metrics), "graft_batch_queue_depth", "graft_batch_queue_depth",
                                   model=MODEL, version=VERSION)
        gate.set()
        for thread in threads:
            thread.join(5)
        rejected = served.predict(np.zeros((5, 2)), "rest")  # over max_batch_size
    finally:
        batcher.close()
    assert not isinstance(results["c"], ServingError)
    np.testing.assert_array_equal(results["c"]["y"], np.full((2, 2), 6.0))
    assert isinstance(rejected, ServingError) and rejected.code == "INVALID_ARGUMENT"
    metrics.observe_request("nope", None, SIGNATURE, "predict", "rest", "NOT_FOUND", 0.00015)

    # Lifecycle: v3 loads fine, v4 fails to load.
    for state in ("START", "LOADING", "AVAILABLE"):
        metrics.on_state(MODEL, 3, state)
    metrics.on_load(MODEL, 3, 1.5, None)
    metrics.on_state(MODEL, 4, "LOADING")
    metrics.on_load(MODEL, 4, 0.2, "bad SavedModel")
    metrics.on_state(MODEL, 4, "END")

    fam = scrape(metrics)
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in fam, f"missing family {name}"
        assert fam[name].type == kind, (name, fam[name].type)

    assert depth_while_queued == 3
    ok = dict(model=MODEL, version=VERSION, signature=SIGNATURE, method="predict", protocol="grpc", code="OK")
    assert value(fam, "graft_requests", "graft_requests_total", **ok) == 3
    assert value(fam, "graft_requests", "graft_requests_total", protocol="rest", code="INVALID_ARGUMENT") == 1
    assert value(fam, "graft_requests", "graft_requests_total", model="nope", version="", code="NOT_FOUND") == 1

    lat = "graft_request_latency_seconds"
    assert value(fam, lat, lat + "_count", protocol="grpc", code="OK") == 3
    assert value(fam, lat, lat + "_count", protocol="rest", code="INVALID_ARGUMENT") == 1  # failures included
    assert value(fam, lat, lat + "_bucket", model="nope", le="0.0001") == 0  # 150 us: resolved
    assert value(fam, lat, lat + "_bucket", model="nope", le="0.0002") == 1

    assert value(fam, "graft_examples", "graft_examples_total", model=MODEL, version=VERSION) == 4

    batch = dict(model=MODEL, version=VERSION, signature=SIGNATURE)
    assert value(fam, "graft_batch_size", "graft_batch_size_count", **batch) == 2
    assert value(fam, "graft_batch_size", "graft_batch_size_sum", **batch) == 4
    assert value(fam, "graft_batch_size", "graft_batch_size_bucket", le="2.0", **batch) == 1
    assert value(fam, "graft_batch_size", "graft_batch_size_bucket", le="4.0", **batch) == 2
    assert value(fam, "graft_batch_padding_rows", "graft_batch_padding_rows_total", **batch) == 2
    delay = "graft_batch_queue_delay_seconds"
    assert value(fam, delay, delay + "_count", **batch) == 3
    assert value(fam, "graft_inference_seconds", "graft_inference_seconds_count", **batch) == 2
    assert value(fam, "graft_inference_seconds", "graft_inference_seconds_sum", **batch) > 0
    assert value(fam, "graft_batch_queue_depth", "graft_batch_queue_depth", **batch) == 0

    state = "graft_model_version_state"
    assert value(fam, state, state, model=MODEL, version=3, state="AVAILABLE") == 1
    assert sum(value(fam, state, state, model=MODEL, version=3, state=s)
               for s in ("START", "LOADING", "UNLOADING", "END", "ERROR")) == 0
    assert value(fam, state, state, model=MODEL, version=4, state="END") == 1
    assert value(fam, state, state, model=MODEL, version=4, state="LOADING") == 0
    assert value(fam, "graft_model_load_seconds", "graft_model_load_seconds_count", model=MODEL) == 1
    assert value(fam, "graft_model_load_seconds", "graft_model_load_seconds_sum", model=MODEL) == 1.5
    assert value(fam, "graft_model_load_failures", "graft_model_load_failures_total", model=MODEL) == 1

    (build,) = fam["graft_build_info"].samples
    assert build.labels == {
        "version": importlib.metadata.version("graft"),
        "tensorflow_version": importlib.metadata.version("tensorflow"),
        "python_version": platform.python_version(),
    }
    assert value(fam, "graft_device_memory_bytes", "graft_device_memory_bytes", device="GPU:0") == 4096
    assert value(fam, "process_start_time_seconds", "process_start_time_seconds") > 0

    # Unloading a version drops its (otherwise stale) queue-depth series.
    metrics.on_unload(MODEL, VERSION)
    assert not scrape(metrics)["graft_batch_queue_depth"].samples


def test_device_memory_has_samples_only_with_gpus():
    tf = pytest.importorskip("tensorflow")
    fam = scrape(ServingMetrics(CollectorRegistry()))
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    # The family is always declared, so dashboards and alerts find it on CPU nodes too.
    assert "graft_device_memory_bytes" in fam
    assert bool(fam["graft_device_memory_bytes"].samples) == has_gpu


def test_failing_device_reader_does_not_break_the_scrape():
    def broken():
        raise RuntimeError("driver gone")

    fam = scrape(ServingMetrics(CollectorRegistry(), device_memory=broken))
    assert "graft_device_memory_bytes" not in fam and "graft_requests" in fam


def test_registries_are_independent_and_the_global_one_untouched():
    first, second = ServingMetrics(CollectorRegistry()), ServingMetrics(CollectorRegistry())
    first.observe_request(MODEL, 1, SIGNATURE, "predict", "rest", "OK", 0.01)
    assert value(scrape(first), "graft_requests", "graft_requests_total") == 1
    assert value(scrape(second), "graft_requests", "graft_requests_total") == 0
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "graft_" not in global_text


def test_latency_buckets_span_sub_millisecond_to_multi_second():
    assert LATENCY_BUCKETS[0] <= 1e-4 and LATENCY_BUCKETS[-1] >= 10
    ratios = [b / a for a, b in zip(LATENCY_BUCKETS, LATENCY_BUCKETS[1:])]
    assert max(ratios) <= 2.0 + 1e-9
