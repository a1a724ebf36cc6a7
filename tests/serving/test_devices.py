"""Device placement: GPU memory plans, least-busy replica routing, real placement on CPU devices.

The GPU choices are pure functions, tested here with device lists standing in
for GPUs; the placement itself is tested for real on CPU devices (one in this
process, two logical CPUs in a child process). bench/gpu_check.sh checks GPUs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow as tf
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from serving import devices
from serving.devices import GpuOptions, GpuSetting, ReplicaPool, least_busy, memory_limit_mb, plan_gpus
from serving.metrics import ServingMetrics
from serving.servable import Servable, servable_loader

GIB = 1024**3


# -- memory plans ------------------------------------------------------------------


def test_default_is_memory_growth_on_every_gpu():
    assert plan_gpus([80 * GIB, 80 * GIB], GpuOptions()) == [
        GpuSetting(0, None, True), GpuSetting(1, None, True)]
    assert [s.device for s in plan_gpus([None, None], GpuOptions())] == ["/device:GPU:0", "/device:GPU:1"]


def test_no_gpu_no_plan():
    assert plan_gpus([], GpuOptions(memory_fraction=0.5)) == []


def test_fraction_is_computed_from_each_gpus_total():
    plan = plan_gpus([80 * GIB, 16 * GIB], GpuOptions(memory_fraction=0.25))
    assert plan == [GpuSetting(0, 20 * 1024, False), GpuSetting(1, 4 * 1024, False)]
    # Rounded down to whole MiB, never zero.
    assert memory_limit_mb(3 * 1024 * 1024 + 5, GpuOptions(memory_fraction=0.5)) == 1
    assert memory_limit_mb(1024, GpuOptions(memory_fraction=0.5)) == 1


def test_fixed_limit_and_growth_off():
    assert plan_gpus([None], GpuOptions(memory_limit_mb=3000)) == [GpuSetting(0, 3000, False)]
    assert plan_gpus([8 * GIB], GpuOptions(memory_growth=False)) == [GpuSetting(0, None, False)]


def test_fraction_without_a_known_total_is_an_error_naming_the_alternative():
    with pytest.raises(ValueError, match="gpu_memory_limit_mb"):
        plan_gpus([None], GpuOptions(memory_fraction=0.5))


@pytest.mark.parametrize("kwargs, message", [
    ({"memory_fraction": 1.5}, "per_process_gpu_memory_fraction"),
    ({"memory_fraction": -0.1}, "per_process_gpu_memory_fraction"),
    ({"memory_limit_mb": -1}, "gpu_memory_limit_mb"),
    ({"memory_fraction": 0.5, "memory_limit_mb": 100}, "not both"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GpuOptions(**kwargs)


def test_configure_gpus_returns_one_device_per_visible_gpu():
    gpus = tf.config.list_physical_devices("GPU")
    assert devices.configure_gpus(GpuOptions()) == [f"/device:GPU:{i}" for i in range(len(gpus))]


# -- least-busy routing ------------------------------------------------------------


def test_least_busy_picks_the_fewest_in_flight():
    assert least_busy([3, 0, 1]) == 1
    assert least_busy([2, 2, 1], last=2) == 2
    with pytest.raises(ValueError):
        least_busy([])


def test_least_busy_rotates_ties():
    assert [least_busy([0, 0, 0], last) for last in (-1, 0, 1, 2)] == [0, 1, 2, 0]
    assert least_busy([1, 0, 0], last=1) == 2


def test_pool_spreads_concurrent_runs_and_releases():
    pool = ReplicaPool(["gpu0", "gpu1", "gpu2"])
    with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
        assert sorted((a, b, c)) == ["gpu0", "gpu1", "gpu2"]
        assert pool.in_flight() == [1, 1, 1]
        with pool.acquire() as d:
            assert pool.in_flight().count(2) == 1
            assert d in ("gpu0", "gpu1", "gpu2")
    assert pool.in_flight() == [0, 0, 0]
    # A run that raises still releases its replica.
    with pytest.raises(RuntimeError):
        with pool.acquire():
            raise RuntimeError("boom")
    assert pool.in_flight() == [0, 0, 0]


def test_pool_goes_to_the_idle_replica_while_another_is_busy():
    pool = ReplicaPool(["gpu0", "gpu1"])
    busy = threading.Event()
    release = threading.Event()

    def hold():
        with pool.acquire():
            busy.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert busy.wait(10)
        held = pool.in_flight().index(1)
        for _ in range(5):  # every new run avoids the busy replica
            with pool.acquire() as replica:
                assert replica == f"gpu{1 - held}"
    finally:
        release.set()
        thread.join()


# -- placement on a real device --------------------------------------------------------


def test_servable_placed_on_cpu0_runs_there(tiny_cnn_savedmodel, tiny_cnn_keras):
    servable = servable_loader(["/device:CPU:0"])("cnn", 1, str(tiny_cnn_savedmodel))
    assert servable.devices == ("/device:CPU:0",) and servable.device == "/device:CPU:0"
    placed = servable.variable_devices()
    assert list(placed) == ["/device:CPU:0"]
    assert placed["/device:CPU:0"] and all(d.endswith("device:CPU:0") for d in placed["/device:CPU:0"])
    batch = np.random.default_rng(3).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    out = servable.run("serving_default", {"images": batch})["output_0"]
    np.testing.assert_allclose(out, tiny_cnn_keras.predict(batch, verbose=0), atol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-4


def test_no_devices_means_tensorflows_default_placement(tiny_cnn_savedmodel):
    loader = servable_loader([])
    assert loader.func == Servable.load and loader.keywords == {"device": None, "freeze": True}
    servable = Servable.load("cnn", 1, str(tiny_cnn_savedmodel))
    assert servable.devices == () and servable.device is None


_TWO_CPUS = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    import tensorflow as tf

    cpu, = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from serving.servable import Servable

    names = ("/device:CPU:0", "/device:CPU:1")
    servable = Servable.load("cnn", 1, sys.argv[1], device=names)
    placed = servable.variable_devices()
    assert list(placed) == list(names), placed
    for name in names:
        assert placed[name] and all(d.endswith(name[-5:]) for d in placed[name]), placed
    batch = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = servable.run("serving_default", {"images": batch})["output_0"]
    seen, errors, stop = [0, 0], [], threading.Event()

    def client():
        try:
            while not stop.is_set():
                got = servable.run("serving_default", {"images": batch})["output_0"]
                np.testing.assert_allclose(got, expected, atol=1e-5)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    end = time.monotonic() + 20
    while time.monotonic() < end and not (seen[0] and seen[1]):
        for i, n in enumerate(servable.in_flight()):
            seen[i] = max(seen[i], n)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen[0] and seen[1], seen
    assert servable.in_flight() == [0, 0]
    print("OK", placed)
""")


def test_one_replica_per_device_each_placed_and_used(tiny_cnn_savedmodel):
    # Two logical CPUs stand in for two GPUs; they must be made before TensorFlow
    # initialises, hence a fresh process.
    result = subprocess.run([sys.executable, "-c", _TWO_CPUS, str(tiny_cnn_savedmodel)],
                            capture_output=True, text=True, timeout=120,
                            env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin",
                                 "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")


# -- device memory metric ------------------------------------------------------------


def test_memory_in_use_reads_each_device_and_skips_unready_ones():
    readings = {"GPU:0": {"current": 1234, "peak": 5000}}

    def info(device):
        if device not in readings:
            raise ValueError(f"No matching devices found for '{device}'")
        return readings[device]

    assert devices.memory_in_use(["/device:GPU:0", "/device:GPU:1"], info) == {"GPU:0": 1234}
    assert devices.memory_label("/device:GPU:3") == "GPU:3" and devices.memory_label("GPU:1") == "GPU:1"
    assert devices.memory_reader([])() == {}


def test_memory_in_use_leaves_out_a_device_whose_allocator_keeps_no_stats():
    # What TensorFlow raises for the CPU allocator on builds that keep no statistics.
    def no_stats(device):
        raise ValueError(f"Allocator stats not available for device '{device}'")

    assert devices.memory_in_use(["/device:CPU:0"], no_stats) == {}
    # TensorFlow's own reader on this process's CPU, whichever way this build answers:
    # a byte count, or no entry at all; never an exception.
    real = devices.memory_in_use(["/device:CPU:0"], tf.config.experimental.get_memory_info)
    assert real in ({}, {"CPU:0": real.get("CPU:0")}) and all(v >= 0 for v in real.values())


def test_device_memory_metric_reports_the_reader():
    readings = {"GPU:0": 7 * 1024**2, "GPU:1": 3 * 1024**2}
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry, device_memory=lambda: devices.memory_in_use(
        ["/device:GPU:0", "/device:GPU:1"], lambda d: {"current": readings[d]}))
    text = metrics.render()[0].decode()
    family = {f.name: f for f in text_string_to_metric_families(text)}["graft_device_memory_bytes"]
    assert {s.labels["device"]: s.value for s in family.samples} == {"GPU:0": 7 * 1024**2, "GPU:1": 3 * 1024**2}
    readings["GPU:0"] = 1
    again = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}
    assert {s.labels["device"]: s.value for s in again["graft_device_memory_bytes"].samples}["GPU:0"] == 1
    # No placed device (a CPU-only server): the family has no samples.
    empty = ServingMetrics(CollectorRegistry(), device_memory=devices.memory_reader([]))
    families = {f.name: f for f in text_string_to_metric_families(empty.render()[0].decode())}
    assert not families.get("graft_device_memory_bytes") or not families["graft_device_memory_bytes"].samples
