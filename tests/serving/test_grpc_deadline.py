"""gRPC deadlines with batching on: a call without a deadline must not be treated as one.

grpc's ``time_remaining()`` never returns None; without a client deadline it is
the time to a far-future instant, which once overflowed the batcher's waits and
turned every deadline-less Predict into INTERNAL.

Each test runs on both event loops of ``--grpc_event_loop`` (uvloop by default,
asyncio's own as the fallback): batched Predict awaits its batch and its deadline
on that loop.
"""

from __future__ import annotations

import gc

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from tests import models
from tests.serving.server import serving


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def client(request, tmp_path_factory, two_input_savedmodel):
    root = tmp_path_factory.mktemp("deadline_repo")
    models.install_version(two_input_savedmodel, root / "two", 1)
    params = root / "batching.txt"
    params.write_text("max_batch_size { value: 4 }\nbatch_timeout_micros { value: 2000 }\n")
    with serving(model_name="two", model_base_path=str(root / "two"), enable_batching=True,
                 batching_parameters_file=str(params), grpc_event_loop=request.param) as (server, client):
        assert server.grpc_event_loop == request.param
        yield client


def _request(x: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "two"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    request.inputs["tag"].CopyFrom(tf.make_tensor_proto(np.array([b"a"] * len(x), dtype=object)))
    return request


def test_predict_without_deadline_is_served(client):
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    response = client.predict.Predict(_request(x))  # no timeout: no deadline at all
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), models.two_input_expected(x), atol=1e-5)


def test_predict_with_deadline_is_served(client):
    x = np.array([[0.5, -1.0, 2.0]], np.float32)
    response = client.predict.Predict(_request(x), timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).shape == (1, 2)


def test_expired_deadline_is_deadline_exceeded(client):
    with pytest.raises(grpc.RpcError) as info:
        client.predict.Predict(_request(np.ones((1, 3), np.float32)), timeout=1e-6)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_batched_predict_leaves_no_reference_cycles(client):
    # Anything a call leaves in a reference cycle waits for the garbage collector, whose
    # passes over the served model's heap hold the GIL for tens of ms (docs/benchmarks.md).
    # Client and server share this process, so the count covers both; neither may leak.
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    for _ in range(3):  # one-off objects of the first calls
        client.predict.Predict(_request(x), timeout=30)
    gc.collect()
    gc.disable()
    try:
        for i in range(30):
            client.predict.Predict(_request(x + i), timeout=30 if i % 2 else None)
        left_in_cycles = gc.collect()
    finally:
        gc.enable()
    # grpc.aio itself leaves five objects a call (its handler lookup closure); graft adds none.
    assert left_in_cycles <= 5 * 30, f"{left_in_cycles} objects left in reference cycles by 30 calls"
