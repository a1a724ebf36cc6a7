"""The performance flags of a real graft-serve process: batching through both protocols, TF threads.

One child process serves the tiny CNN with batching on (allowed batch sizes that
force padding, large-batch splitting on) and explicit TensorFlow thread counts.
Many concurrent clients, over gRPC and REST at once, each send distinct images
in requests of varying sizes, some larger than max_batch_size; every answer must
be that client's own rows (MLServer#1541 mixed them up). The server's metrics
must show that batches really were shared, padded and split.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from tests import models
from tests.ports import free_port
from tests.serving.server import Subprocess

MAX_BATCH = 8
BATCHING = f"""
max_batch_size {{ value: {MAX_BATCH} }}
batch_timeout_micros {{ value: 20000 }}
max_enqueued_batches {{ value: 100 }}
num_batch_threads {{ value: 2 }}
allowed_batch_sizes: 3
allowed_batch_sizes: 5
allowed_batch_sizes: {MAX_BATCH}
enable_large_batch_splitting {{ value: true }}
"""
# Not the default on any machine (TF picks the core count), so seeing it proves the flag.
INTER_OP = (os.cpu_count() or 1) + 1
# Not Python's default (5000 us): the server reads the interval back from the interpreter.
SWITCH_INTERVAL_US = 250
# --tensorflow_cpus 1 where there is a CPU left for the other threads.
PIN = len(os.sched_getaffinity(0)) >= 2
SIZES = (1, 2, 4, 1, 3, 11, 1, 2)  # 11 > MAX_BATCH: split; odd totals: padded
CLIENTS = 12
ROUNDS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_cnn_savedmodel):
    root = tmp_path_factory.mktemp("perf_wiring")
    models.install_version(tiny_cnn_savedmodel, root / "cnn", 1)
    params = root / "batching.txt"
    params.write_text(BATCHING)
    proc = Subprocess(["--port", "0", "--rest_api_port", str(free_port()), "--model_name", "cnn",
                       "--model_base_path", str(root / "cnn"), "--batching_parameters_file", str(params),
                       "--tensorflow_intra_op_parallelism", "1",
                       "--tensorflow_inter_op_parallelism", str(INTER_OP),
                       "--python_switch_interval_micros", str(SWITCH_INTERVAL_US),
                       *(["--tensorflow_cpus", "1"] if PIN else [])],
                      root / "server.log")
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def _images(client: int, round_: int, rows: int) -> np.ndarray:
    # Distinct per client, round and row: no two requests can share an answer.
    rng = np.random.default_rng(1000 * client + round_)
    return rng.uniform(0, 255, (rows, 32, 32, 3)).astype(np.float32)


def _grpc_predict(proc: Subprocess, images: np.ndarray) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.inputs["images"].CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_content=images.tobytes(),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in images.shape])))
    response = proc.client.predict.Predict(request, timeout=60)
    out = response.outputs["output_0"]
    shape = [d.size for d in out.tensor_shape.dim]
    return np.frombuffer(out.tensor_content, np.float32).reshape(shape)


def _rest_predict(proc: Subprocess, images: np.ndarray) -> np.ndarray:
    response = requests.post(f"{proc.client.rest}/v1/models/cnn:predict",
                             json={"instances": images.tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["predictions"], np.float32)


def _metrics(proc: Subprocess) -> dict:
    text = requests.get(f"{proc.client.rest}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict, family: str, sample: str) -> float:
    return sum(s.value for s in families[family].samples if s.name == sample)


def test_concurrent_distinct_requests_over_both_protocols_get_their_own_rows(server, tiny_cnn_keras):
    before = _metrics(server)
    results: list[tuple[np.ndarray, np.ndarray]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        call = _grpc_predict if c % 2 == 0 else _rest_predict
        try:
            start.wait(30)
            for r in range(ROUNDS):
                images = _images(c, r, SIZES[(c + r) % len(SIZES)])
                got = call(server, images)
                with lock:
                    results.append((images, got))
        except BaseException as exc:  # recorded: asserted empty below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(results) == CLIENTS * ROUNDS
    images = np.concatenate([i for i, _ in results])
    expected = tiny_cnn_keras.predict(images, verbose=0)
    pos = 0
    for sent, got in results:
        assert got.shape == (len(sent), 3)
        np.testing.assert_allclose(got, expected[pos:pos + len(sent)], atol=1e-5)
        pos += len(sent)
    # The model's answers vary, so a mixed-up answer could not have matched.
    assert np.abs(expected[0] - expected[1]).max() > 1e-4

    after = _metrics(server)
    rows = sum(len(sent) for sent, _ in results)
    batches = (_sample(after, "graft_batch_size", "graft_batch_size_count")
               - _sample(before, "graft_batch_size", "graft_batch_size_count"))
    batched_rows = (_sample(after, "graft_batch_size", "graft_batch_size_sum")
                    - _sample(before, "graft_batch_size", "graft_batch_size_sum"))
    padding = (_sample(after, "graft_batch_padding_rows", "graft_batch_padding_rows_total")
               - _sample(before, "graft_batch_padding_rows", "graft_batch_padding_rows_total"))
    assert batched_rows == rows
    assert batches < len(results), "no batch was shared by two requests"
    assert padding > 0, "no batch was padded to an allowed size"
    # Requests of 11 rows cannot fit one batch of 8: they were split and reassembled.
    assert any(len(sent) > MAX_BATCH for sent, _ in results)
    codes = Counter()
    for s in after["graft_requests"].samples:
        if s.name == "graft_requests_total":
            codes[(s.labels["protocol"], s.labels["code"])] += s.value
    assert codes[("grpc", "OK")] >= CLIENTS * ROUNDS // 2 and codes[("rest", "OK")] >= CLIENTS * ROUNDS // 2


def test_tensorflow_thread_flags_configure_the_runtime(server):
    # Ask for one prediction so every TF thread pool exists.
    _grpc_predict(server, _images(0, 0, 1))
    task_dir = f"/proc/{server.proc.pid}/task"
    names = Counter()
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/comm") as f:
                names[f.read().strip()] += 1
        except FileNotFoundError:  # a thread that just ended
            continue
    # TensorFlow's inter-op pool threads are named tf_Compute, one per thread.
    assert names["tf_Compute"] == INTER_OP, names
    assert f"TensorFlow threads: intra_op=1 inter_op={INTER_OP}" in server.log()


@pytest.mark.skipif(not PIN, reason="needs two CPUs")
def test_tensorflow_cpus_puts_tensorflow_threads_on_the_last_cpu_and_the_others_on_the_rest(server):
    _grpc_predict(server, _images(0, 0, 1))   # every thread pool and handler thread exists now
    cpus = sorted(os.sched_getaffinity(0))
    task_dir = f"/proc/{server.proc.pid}/task"
    placed: dict[str, set[frozenset[int]]] = {"tensorflow": set(), "other": set()}
    policies: dict[str, set[int]] = {"tensorflow": set(), "other": set()}
    counts = Counter()
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/comm") as f:
                name = f.read().strip()
            mask = frozenset(os.sched_getaffinity(int(tid)))
            policy = os.sched_getscheduler(int(tid))
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
        side = "tensorflow" if name.startswith("tf_") else "other"
        placed[side].add(mask)
        policies[side].add(policy)
        counts[side] += 1
    # INTER_OP tf_Compute threads and more; the main, gRPC, REST, batch and loader threads.
    assert counts["tensorflow"] >= INTER_OP and counts["other"] >= 5, counts
    assert placed == {"tensorflow": {frozenset(cpus[-1:])}, "other": {frozenset(cpus[:-1])}}, placed
    # The request threads do not preempt each other on wake-up; the model's threads still do.
    assert policies == {"tensorflow": {os.SCHED_OTHER}, "other": {os.SCHED_BATCH}}, policies
    assert f"CPUs {cpus[-1]}; the other threads" in server.log()
    assert "under SCHED_BATCH" in server.log()


def test_switch_interval_flag_sets_the_interpreters_interval(server):
    assert f"Python switch interval: {SWITCH_INTERVAL_US} us" in server.log()


def test_switch_interval_flag_refuses_zero_and_defaults_to_pythons():
    from serving.runtime.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["--model_base_path", "/m"]).python_switch_interval_micros is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--model_base_path", "/m", "--python_switch_interval_micros", "0"])


def test_batching_raises_default_handler_threads_to_fill_batches():
    from serving.config import BatchingConfig
    from serving.runtime.server import MAX_BATCHING_THREADS, cpus, handler_threads
    from serving.runtime.settings import ServerConfig

    n = cpus()
    config = ServerConfig(model_base_path="/m")
    assert handler_threads(config, None) == (4 * n, max(8, 4 * n))
    assert handler_threads(config, BatchingConfig(max_batch_size=100)) == (max(200, 4 * n),) * 2
    # TF Serving's default max_batch_size, 1000
    assert handler_threads(config, BatchingConfig())[0] == max(MAX_BATCHING_THREADS, 4 * n)
    # Explicit values always win.
    explicit = config.replace(grpc_max_threads=3, rest_api_num_threads=5)
    assert handler_threads(explicit, BatchingConfig(max_batch_size=100)) == (3, 5)
