"""Tests of serving.metrics: known traffic through a real InferenceService (real
ModelManager, SavedModel and batcher), read back by parsing the exposition text
with prometheus_client.parser."""

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

from serving.config import BatchingConfig
from serving.config import ModelConfig
from serving.errors import InvalidArgument, NotFound, ServingError
from serving.manager import ModelManager
from serving.metrics import LATENCY_BUCKETS, ServingMetrics
from serving.service import InferenceService, PredictCall
from tests import models
import tensorflow as tf

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


@pytest.fixture(scope="module")
def repo(tmp_path_factory, two_input_savedmodel):
    root = tmp_path_factory.mktemp("metrics_repo")
    models.install_version(two_input_savedmodel, root / MODEL, VERSION)
    return root


def start_service(repo, metrics: ServingMetrics, batching: BatchingConfig | None):
    """A real InferenceService over a real ModelManager serving the two-input SavedModel."""
    manager = ModelManager([ModelConfig(MODEL, str(repo / MODEL))], poll_seconds=0)
    manager.add_listener(metrics)
    service = InferenceService(manager, metrics=metrics, batching=batching)
    manager.start()
    manager.wait_until_available(MODEL)
    return manager, service


def stop_service(manager, service) -> None:
    service.begin_drain()
    manager.stop()
    service.close()


def predict(service, x: np.ndarray, protocol: str, model: str = MODEL):
    """One predict through the service, as the adapters call it; the outputs, or the error."""
    tags = np.array([b"t"] * len(x), dtype=object)
    try:
        return service.predict(PredictCall(model=model, inputs={"x": x, "tag": tags}, protocol=protocol)).outputs
    except ServingError as err:
        return err


def wait_for_gauge(metrics: ServingMetrics, family: str, expected: float, **labels) -> None:
    end = time.monotonic() + 5
    while value(scrape(metrics), family, family, **labels) != expected:
        assert time.monotonic() < end, f"{family} never reached {expected}"
        time.sleep(0.005)


def test_known_traffic_moves_every_family_by_the_expected_amount(repo):
    metrics = ServingMetrics(CollectorRegistry(), device_memory=lambda: {"GPU:0": 4096, "GPU:1": 0})
    # The timeout forms the batches: a lone request waits 0.4 s for company, then runs.
    config = BatchingConfig(max_batch_size=4, allowed_batch_sizes=(2, 4), batch_timeout_micros=400_000,
                            num_batch_threads=1)
    manager, service = start_service(repo, metrics, config)
    x_a, x_b, x_c = (np.full((n, 3), v, dtype=np.float32) for n, v in ((1, 1.0), (1, 2.0), (2, 3.0)))
    results: dict[str, object] = {}
    try:
        # A runs alone (1 row, padded to 2); then B (1 row) and C (2 rows) share one batch
        # of 3 rows, padded to 4, and wait in the queue together until the timeout.
        results["a"] = predict(service, x_a, "grpc")
        threads = [threading.Thread(target=lambda k=k, x=x: results.__setitem__(k, predict(service, x, "grpc")))
                   for k, x in (("b", x_b), ("c", x_c))]
        for thread in threads:
            thread.start()
        wait_for_gauge(metrics, "graft_batch_queue_depth", 3, model=MODEL, version=VERSION)
        for thread in threads:
            thread.join(5)
        rejected = predict(service, np.zeros((5, 3), dtype=np.float32), "rest")  # over max_batch_size
        unknown = predict(service, x_a, "rest", model="nope")
        # A refusal an adapter made before the service saw it (a body that is not JSON).
        refused = InvalidArgument("JSON Parse error: Invalid value")
        service.observe_refusal("rest", "predict", MODEL, refused, 0.00015)
        service.observe_refusal("rest", "predict", MODEL, refused, 0.00015)  # counted once
    finally:
        stop_service(manager, service)
    for key, x in (("a", x_a), ("b", x_b), ("c", x_c)):
        np.testing.assert_allclose(results[key]["y"], models.two_input_expected(x), atol=1e-5)
    assert isinstance(rejected, InvalidArgument) and rejected.counted
    assert isinstance(unknown, NotFound)

    # A load failure, reported as the manager reports one.
    metrics.on_state(MODEL, 4, "LOADING")
    metrics.on_load(MODEL, 4, 0.2, "bad SavedModel")
    metrics.on_state(MODEL, 4, "END")

    fam = scrape(metrics)
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in fam, f"missing family {name}"
        assert fam[name].type == kind, (name, fam[name].type)

    ok = dict(model=MODEL, version=VERSION, signature=SIGNATURE, method="predict", protocol="grpc", code="OK")
    assert value(fam, "graft_requests", "graft_requests_total", **ok) == 3
    assert value(fam, "graft_requests", "graft_requests_total", protocol="rest", version=VERSION,
                 code="INVALID_ARGUMENT") == 1
    assert value(fam, "graft_requests", "graft_requests_total", model="nope", version="", code="NOT_FOUND") == 1
    assert value(fam, "graft_requests", "graft_requests_total", model=MODEL, version="", signature="",
                 code="INVALID_ARGUMENT") == 1

    lat = "graft_request_latency_seconds"
    assert value(fam, lat, lat + "_count", protocol="grpc", code="OK") == 3
    # Failures are included, those the service answered and those an adapter refused.
    assert value(fam, lat, lat + "_count", protocol="rest", signature=SIGNATURE, code="INVALID_ARGUMENT") == 1
    assert value(fam, lat, lat + "_bucket", model=MODEL, signature="", le="0.0001") == 0  # 150 us: resolved
    assert value(fam, lat, lat + "_bucket", model=MODEL, signature="", le="0.0002") == 1
    # B and C waited for the 0.4 s timeout: the latency histogram sees it.
    assert value(fam, lat, lat + "_bucket", protocol="grpc", code="OK", le="0.2048") == 0

    assert value(fam, "graft_examples", "graft_examples_total", model=MODEL, version=VERSION) == 4

    batch = dict(model=MODEL, version=VERSION, signature=SIGNATURE)
    assert value(fam, "graft_batch_size", "graft_batch_size_count", **batch) == 2
    assert value(fam, "graft_batch_size", "graft_batch_size_sum", **batch) == 4
    assert value(fam, "graft_batch_size", "graft_batch_size_bucket", le="2.0", **batch) == 1
    assert value(fam, "graft_batch_size", "graft_batch_size_bucket", le="4.0", **batch) == 2
    assert value(fam, "graft_batch_padding_rows", "graft_batch_padding_rows_total", **batch) == 2
    delay = "graft_batch_queue_delay_seconds"
    assert value(fam, delay, delay + "_count", **batch) == 3
    assert value(fam, delay, delay + "_bucket", le="0.2048", **batch) == 0  # each waited the timeout out
    assert value(fam, "graft_inference_seconds", "graft_inference_seconds_count", **batch) == 2
    assert value(fam, "graft_inference_seconds", "graft_inference_seconds_sum", **batch) > 0

    state = "graft_model_version_state"
    assert value(fam, state, state, model=MODEL, version=VERSION, state="END") == 1  # stopped
    assert value(fam, state, state, model=MODEL, version=VERSION, state="AVAILABLE") == 0
    assert value(fam, state, state, model=MODEL, version=4, state="END") == 1
    assert value(fam, state, state, model=MODEL, version=4, state="LOADING") == 0
    assert value(fam, "graft_model_load_seconds", "graft_model_load_seconds_count", model=MODEL) == 1
    assert value(fam, "graft_model_load_seconds", "graft_model_load_seconds_sum", model=MODEL) > 0
    assert value(fam, "graft_model_load_failures", "graft_model_load_failures_total", model=MODEL) == 1

    (build,) = fam["graft_build_info"].samples
    assert build.labels == {
        "version": importlib.metadata.version("graft"),
        "tensorflow_version": importlib.metadata.version("tensorflow"),
        "python_version": platform.python_version(),
    }
    assert value(fam, "graft_device_memory_bytes", "graft_device_memory_bytes", device="GPU:0") == 4096
    assert value(fam, "process_start_time_seconds", "process_start_time_seconds") > 0

    # Stopping unloaded the version, which dropped its (otherwise stale) queue-depth series.
    assert not fam["graft_batch_queue_depth"].samples


def test_runs_without_a_batcher_are_timed_too(repo):
    metrics = ServingMetrics(CollectorRegistry())
    manager, service = start_service(repo, metrics, None)
    try:
        for i in range(3):
            x = np.full((2, 3), float(i), dtype=np.float32)
            np.testing.assert_allclose(predict(service, x, "grpc")["y"], models.two_input_expected(x), atol=1e-5)
    finally:
        stop_service(manager, service)
    fam = scrape(metrics)
    batch = dict(model=MODEL, version=VERSION, signature=SIGNATURE)
    assert value(fam, "graft_inference_seconds", "graft_inference_seconds_count", **batch) == 3
    assert value(fam, "graft_inference_seconds", "graft_inference_seconds_sum", **batch) > 0
    assert value(fam, "graft_batch_size", "graft_batch_size_count", **batch) == 0


def test_device_memory_has_samples_only_with_gpus():
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
