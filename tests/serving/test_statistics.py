"""Per-version inference statistics (serving.statistics): what the batcher and the service record.

The counts are checked against the requests and runs each test makes itself; the
V2 adapters' tests (test_v2_rest, test_v2_grpc) read the same numbers through
tritonclient.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import Batcher
from serving.codecs import v2
from serving.config import BatchingConfig, ModelConfig
from serving.errors import InvalidArgument, NotFound
from serving.manager import ModelManager
from serving.service import InferenceService, PredictCall
from serving.statistics import Duration, Timing, VersionStatistics
from tests import models

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
TAGS = np.array([b"ab", b"c"], dtype=object)


# ------------------------------------------------------------------ VersionStatistics


def test_requests_and_executions_are_counted_in_nanoseconds():
    stats = VersionStatistics("m", 3, clock=lambda: 1_700_000_000.25)
    timing = Timing()
    timing.add(0.001, 0.0002, 0.003, 0.0001)
    stats.record_request(True, 0.005, 4, timing)
    stats.record_request(False, 0.0005, 0)
    stats.on_execution(8, 0.0002, 0.003, 0.0001)
    stats.on_execution(4, 0.0, 0.002, 0.0)
    stats.on_execution(8, 0.0, 0.001, 0.0)
    snap = stats.snapshot()
    assert (snap.name, snap.version, snap.last_inference_ms) == ("m", 3, 1_700_000_000_250)
    assert (snap.inference_count, snap.execution_count) == (4, 3)
    assert (snap.success, snap.fail) == (Duration(1, 5_000_000), Duration(1, 500_000))
    assert (snap.queue, snap.compute_input, snap.compute_infer, snap.compute_output) == (
        Duration(1, 1_000_000), Duration(1, 200_000), Duration(1, 3_000_000), Duration(1, 100_000))
    assert [(b.batch_size, b.compute_infer) for b in snap.batches] == [
        (4, Duration(1, 2_000_000)), (8, Duration(2, 4_000_000))]
    # A snapshot is a copy: later counts do not change it.
    stats.on_execution(4, 0.0, 0.001, 0.0)
    assert snap.execution_count == 3 and snap.batches[0].compute_infer.count == 1


def test_a_fresh_version_reports_zeros():
    snap = VersionStatistics("m", 1).snapshot()
    assert (snap.last_inference_ms, snap.inference_count, snap.execution_count, snap.batches) == (0, 0, 0, [])
    assert v2._model_stat(snap)["inference_stats"]["success"] == {"count": 0, "ns": 0}


# ------------------------------------------------------------------------ Batcher


def _double(inputs):
    return {"y": inputs["x"] * 2.0}


class Executions:
    def __init__(self):
        self.runs = []
        self.lock = threading.Lock()

    def on_execution(self, batch_size, input_s, infer_s, output_s):
        with self.lock:
            self.runs.append((batch_size, input_s, infer_s, output_s))


def test_batcher_reports_each_successful_run_and_each_request_timing():
    executions = Executions()
    config = BatchingConfig(max_batch_size=4, allowed_batch_sizes=(2, 4), num_batch_threads=1,
                            enable_large_batch_splitting=True, max_enqueued_batches=100)
    batcher = Batcher(_double, config, executions=executions)
    try:
        timing = Timing()
        rows = np.arange(15, dtype=np.float32).reshape(5, 3)
        out = batcher.submit({"x": rows}, timing=timing)  # split: 4 rows + 1 row padded to 2
        np.testing.assert_array_equal(out["y"], rows * 2.0)
        assert sorted(size for size, *_ in executions.runs) == [2, 4]
        # The request's run time is its two parts' runs; each was timed, none is negative.
        assert timing.infer_s == pytest.approx(sum(run[2] for run in executions.runs))
        assert min(timing.queue_s, timing.input_s, timing.output_s) >= 0 and timing.infer_s > 0
    finally:
        batcher.close()


def test_a_failed_run_is_no_execution_and_times_nothing():
    executions = Executions()

    def broken(inputs):
        raise InvalidArgument("bad rows")

    batcher = Batcher(broken, BatchingConfig(max_batch_size=4, num_batch_threads=1), executions=executions)
    try:
        timing = Timing()
        with pytest.raises(InvalidArgument):
            batcher.submit({"x": np.ones((1, 3), np.float32)}, timing=timing)
        assert executions.runs == [] and timing.infer_s == 0.0
    finally:
        batcher.close()


def test_async_submit_fills_the_timing_before_it_wakes():
    executions = Executions()
    batcher = Batcher(_double, BatchingConfig(max_batch_size=8, num_batch_threads=1), executions=executions)

    async def many():
        timings = [Timing() for _ in range(6)]
        await asyncio.gather(*(batcher.submit_async({"x": np.ones((1, 3), np.float32)}, timing=t)
                               for t in timings))
        return timings

    try:
        timings = asyncio.run(many())
        assert all(t.infer_s > 0 for t in timings)
        # The batcher wakes its callers before it reports the execution (latency first),
        # so the report may land just after the last caller returns.
        deadline = time.monotonic() + 10
        while sum(size for size, *_ in executions.runs) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(size for size, *_ in executions.runs) == 6
    finally:
        batcher.close()


# ------------------------------------------------------------------------ service


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_cnn_savedmodel, two_input_savedmodel):
    root = tmp_path_factory.mktemp("statistics_repo")
    models.install_version(tiny_cnn_savedmodel, root / "cnn", 1)
    models.install_version(two_input_savedmodel, root / "two", 1)
    return root


@pytest.fixture
def unbatched(repo):
    manager = ModelManager([ModelConfig("cnn", str(repo / "cnn")), ModelConfig("two", str(repo / "two"))],
                           poll_seconds=0)
    service = InferenceService(manager)
    manager.start()
    manager.wait_until_available("cnn")
    manager.wait_until_available("two")
    yield service
    manager.stop(timeout=10)


def test_without_batching_each_request_is_one_execution(unbatched):
    service = unbatched
    for rows in (2, 2, 1):
        service.predict(PredictCall("two", inputs={"x": X[:rows], "tag": TAGS[:rows]}))
    asyncio.run(service.predict_async(PredictCall("two", inputs={"x": X, "tag": TAGS})))
    with pytest.raises(InvalidArgument):
        service.predict(PredictCall("two", inputs={"x": X[:, :2], "tag": TAGS}))
    with pytest.raises(NotFound):
        service.predict(PredictCall("two", version=7, inputs={"x": X, "tag": TAGS}))  # reaches no version
    (snap,) = service.statistics("two", 1)
    assert (snap.success.count, snap.fail.count, snap.inference_count, snap.execution_count) == (4, 1, 7, 4)
    assert [(b.batch_size, b.compute_infer.count) for b in snap.batches] == [(1, 1), (2, 3)]
    assert snap.queue.count == snap.compute_infer.count == 4
    assert snap.compute_infer.ns + snap.queue.ns <= snap.success.ns + 1000
    assert [s.name for s in service.statistics()] == ["cnn", "two"]
    with pytest.raises(NotFound):
        service.statistics("nope")


def test_model_config_without_batching_keeps_the_batch_dimension(unbatched):
    config = v2.model_config(unbatched, "cnn")
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"] == [{"name": "images", "data_type": "TYPE_FP32", "dims": [-1, 32, 32, 3]}]
    assert config["output"] == [{"name": "output_0", "data_type": "TYPE_FP32", "dims": [-1, 3]}]
