"""Tests of serving.service.InferenceService over a real ModelManager and real SavedModels.

No server here: the service is called directly, as both adapters call it.
Expected outputs come from the Keras model and from numpy (two-input module).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from serving.config import BatchingConfig
from serving.config import ModelConfig
from serving.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from serving.manager import ModelManager
from serving.metrics import ServingMetrics
from graft.contract import CLASSIFY_METHOD, REGRESS_METHOD
from serving.service import (
    ExamplesCall,
    InferenceService,
    InferenceTask,
    MultiInferenceCall,
    PredictCall,
)
from tests import models

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
TAGS = np.array([b"ab", b"\x00xyz"], dtype=object)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_cnn_savedmodel, two_input_savedmodel):
    root = tmp_path_factory.mktemp("service_repo")
    models.install_version(tiny_cnn_savedmodel, root / "cnn", 1)
    models.install_version(two_input_savedmodel, root / "two", 1)
    return root


def _start(repo, **service_kwargs):
    manager = ModelManager([ModelConfig("cnn", str(repo / "cnn")), ModelConfig("two", str(repo / "two"))],
                           poll_seconds=0)
    service = InferenceService(manager, **service_kwargs)
    manager.start()
    manager.wait_until_available("cnn")
    manager.wait_until_available("two")
    return manager, service


@pytest.fixture(scope="module")
def served(repo):
    registry = CollectorRegistry()
    manager, service = _start(repo, metrics=ServingMetrics(registry), max_image_pixels=64 * 64)
    yield service, registry
    service.begin_drain()
    manager.stop()
    service.close()


@pytest.fixture
def service(served):
    return served[0]


def _predict(service, model="two", **kwargs) -> dict:
    return service.predict(PredictCall(model=model, **kwargs)).outputs


def test_predict_two_inputs_matches_numpy(service):
    result = service.predict(PredictCall(model="two", inputs={"x": X, "tag": TAGS}))
    assert (result.model, result.version, result.signature_name) == ("two", 1, "serving_default")
    np.testing.assert_allclose(result.outputs["y"], models.two_input_expected(X), atol=1e-5)
    assert result.outputs["tag_len"].tolist() == [2, 4]
    assert result.outputs["label_bytes"].tolist() == TAGS.tolist()


def test_predict_cnn_matches_keras(service, tiny_cnn_keras):
    images = np.random.default_rng(5).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    out = _predict(service, "cnn", inputs={"images": images})["output_0"]
    expected = tiny_cnn_keras.predict(images, verbose=0)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-4  # the comparison can fail


def test_output_filter(service):
    out = _predict(service, inputs={"x": X, "tag": TAGS}, output_filter=["tag_len"])
    assert list(out) == ["tag_len"]
    with pytest.raises(InvalidArgument, match="output tensor alias not found in signature: nope"):
        _predict(service, inputs={"x": X, "tag": TAGS}, output_filter=["nope"])
    with pytest.raises(InvalidArgument, match="duplicate output tensor alias: y"):
        _predict(service, inputs={"x": X, "tag": TAGS}, output_filter=["y", "y"])


def test_inputs_can_be_decoded_against_the_resolved_signature(service):
    seen = []

    def decode(sig):
        seen.append(sorted(sig.inputs))
        return {"x": X, "tag": TAGS}

    out = _predict(service, inputs=decode)
    assert seen == [["tag", "x"]]
    np.testing.assert_allclose(out["y"], models.two_input_expected(X), atol=1e-5)


@pytest.mark.parametrize("inputs, message", [
    ({"x": X}, "missing input 'tag'"),
    ({"x": X, "tag": TAGS, "extra": X}, "unknown input 'extra'"),
    ({"x": X.astype(np.float64), "tag": TAGS}, "input 'x' expects float32 but got float64"),
    ({"x": X, "tag": np.array([1, 2])}, "input 'tag' expects string but got int64"),
    ({"x": X[0], "tag": TAGS}, r"input 'x' expects shape \[-1, 3\] but got \[3\]"),
    ({"x": np.zeros((2, 4), np.float32), "tag": TAGS}, r"input 'x' expects shape \[-1, 3\] but got \[2, 4\]"),
    ({"x": X, "tag": np.array([b"a"] * 3, dtype=object)}, "inconsistent batch sizes: .*x=2.*tag=3|tag=3.*x=2"),
])
def test_validation_names_the_input(service, inputs, message):
    with pytest.raises(InvalidArgument, match=message):
        _predict(service, inputs=inputs)


def test_unknown_model_version_label_signature(service):
    with pytest.raises(NotFound):
        _predict(service, "nope", inputs={})
    with pytest.raises(NotFound):
        _predict(service, version=7, inputs={"x": X, "tag": TAGS})
    with pytest.raises(InvalidArgument, match="label"):
        _predict(service, label="canary", inputs={"x": X, "tag": TAGS})
    with pytest.raises(FailedPrecondition, match='Serving signature key "nope" not found'):
        _predict(service, signature_name="nope", inputs={"x": X, "tag": TAGS})


def test_model_error_is_invalid_argument_not_internal(service):
    with pytest.raises(InvalidArgument, match="x must be >= 0"):
        _predict(service, signature_name="checked", inputs={"x": -X})
    root = _predict(service, signature_name="checked", inputs={"x": np.abs(X)})["root"]
    np.testing.assert_allclose(root, np.sqrt(np.abs(X)), atol=1e-6)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_images_for_a_float_image_signature(service, tiny_cnn_keras):
    rng = np.random.default_rng(6)
    same_size = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    bigger = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    encoded = np.array([_png(same_size), _png(bigger)], dtype=object)
    out = _predict(service, "cnn", inputs={"images": encoded})["output_0"]
    resized = np.asarray(Image.fromarray(bigger).resize((32, 32), Image.Resampling.BILINEAR))
    expected = tiny_cnn_keras.predict(np.stack([same_size, resized]).astype(np.float32), verbose=0)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_encoded_image_over_the_pixel_limit(service):
    big = np.zeros((65, 64, 3), dtype=np.uint8)  # one row over the 64x64 limit
    with pytest.raises(InvalidArgument, match="input 'images' item 0: image of 64x65"):
        _predict(service, "cnn", inputs={"images": np.array([_png(big)], dtype=object)})
    with pytest.raises(InvalidArgument, match="input 'images' item 0: not a decodable image"):
        _predict(service, "cnn", inputs={"images": np.array([b"nope"], dtype=object)})


def test_images_a_model_decodes_itself_are_held_to_the_pixel_limit(service):
    """String inputs and tf.Example bytes may be decoded in the graph: their headers are checked first."""
    big, small = _png(np.zeros((65, 64, 3), np.uint8)), _png(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InvalidArgument, match="input 'tag' item 1: image of 64x65 = 4160 pixels exceeds"):
        _predict(service, inputs={"x": X, "tag": np.array([small, big], dtype=object)})
    # Images within the limit and bytes that are not images pass untouched.
    out = _predict(service, inputs={"x": X, "tag": np.array([small, b"\x89PNG but not"], dtype=object)})
    assert out["tag_len"].tolist() == [len(small), 12]

    def example(image: bytes) -> bytes:
        ex = models.make_example([1.0, 2.0, 3.0])
        ex.features.feature["image/encoded"].bytes_list.value.append(image)
        return ex.SerializeToString()

    call = ExamplesCall(model="two", signature_name="classify", examples=[example(small), example(big)])
    with pytest.raises(InvalidArgument, match="example 1: feature 'image/encoded': image of 64x65"):
        service.classify(call)
    call = ExamplesCall(model="two", signature_name="regress", examples=[example(small)], context=example(big))
    with pytest.raises(InvalidArgument, match="context: feature 'image/encoded': image of 64x65"):
        service.regress(call)
    assert len(service.classify(ExamplesCall(model="two", signature_name="classify",
                                             examples=[example(small)])).classifications) == 1


def test_strings_for_a_non_image_float_input_are_refused(service):
    with pytest.raises(InvalidArgument, match="input 'x' expects float32 but got string"):
        _predict(service, inputs={"x": np.array([[b"a"] * 3] * 2, dtype=object), "tag": TAGS})


ROWS = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.0, 0.0, 1.0]]


def _examples(rows=ROWS) -> list[bytes]:
    return [models.make_example(r).SerializeToString() for r in rows]


def _softmax(y):
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_classify_and_regress(service):
    y = models.two_input_expected(np.array(ROWS))
    result = service.classify(ExamplesCall(model="two", signature_name="classify", examples=_examples()))
    assert result.version == 1 and result.signature_name == "classify"
    assert [[label for label, _ in row] for row in result.classifications] == [["neg", "pos"]] * 3
    scores = np.array([[score for _, score in row] for row in result.classifications])
    np.testing.assert_allclose(scores, _softmax(y), atol=1e-5)
    reg = service.regress(ExamplesCall(model="two", signature_name="regress", examples=_examples()))
    np.testing.assert_allclose(reg.values, y.sum(axis=1), atol=1e-5)


def test_context_is_merged_into_each_example(service):
    context = models.make_example([1.0, 1.0, 1.0]).SerializeToString()
    empty = b""  # examples without "x": the context supplies it
    reg = service.regress(ExamplesCall(model="two", signature_name="regress",
                                       examples=[empty, empty], context=context))
    expected = models.two_input_expected(np.ones((2, 3))).sum(axis=1)
    np.testing.assert_allclose(reg.values, expected, atol=1e-5)


def test_classify_method_must_match(service):
    with pytest.raises(InvalidArgument, match="Expected classification signature method_name to be "
                                               "tensorflow/serving/classify. Was: tensorflow/serving/predict"):
        service.classify(ExamplesCall(model="two", examples=_examples()))
    with pytest.raises(InvalidArgument, match="Expected regression signature method_name"):
        service.regress(ExamplesCall(model="two", signature_name="classify", examples=_examples()))
    with pytest.raises(InvalidArgument, match="No signature was found with the name: nope"):
        service.regress(ExamplesCall(model="two", signature_name="nope", examples=_examples()))
    with pytest.raises(InvalidArgument, match="Input is empty"):
        service.regress(ExamplesCall(model="two", signature_name="regress", examples=[]))


def test_multi_inference(service):
    results = service.multi_inference(MultiInferenceCall(
        model="two", examples=_examples(),
        tasks=[InferenceTask("classify", CLASSIFY_METHOD), InferenceTask("regress", REGRESS_METHOD)]))
    y = models.two_input_expected(np.array(ROWS))
    np.testing.assert_allclose([[s for _, s in row] for row in results[0].classifications],
                               _softmax(y), atol=1e-5)
    np.testing.assert_allclose(results[1].values, y.sum(axis=1), atol=1e-5)
    with pytest.raises(InvalidArgument, match="Duplicate evaluation of signature: regress"):
        service.multi_inference(MultiInferenceCall(
            model="two", examples=_examples(),
            tasks=[InferenceTask("regress", REGRESS_METHOD), InferenceTask("regress", REGRESS_METHOD)]))
    with pytest.raises(InvalidArgument, match="Unsupported signature method_name"):
        service.multi_inference(MultiInferenceCall(
            model="two", examples=_examples(), tasks=[InferenceTask("", "tensorflow/serving/predict")]))


def test_status_metadata_and_list(service):
    status = service.model_status("two")
    assert [(s.version, s.state) for s in status] == [(1, "AVAILABLE")]
    meta = service.model_metadata("two")
    assert meta.version == 1
    assert set(meta.signature_def_map.signature_def) == {"serving_default", "checked", "classify", "regress"}
    listed = {m["name"]: m for m in service.list_models()}
    assert set(listed) == {"cnn", "two"}
    assert listed["cnn"]["model_version_status"][0] == {
        "version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    assert service.ready() and service.live()


def test_request_metrics_are_recorded(served):
    service, registry = served
    labels = {"model": "two", "version": "1", "signature": "serving_default", "method": "predict",
              "protocol": "grpc", "code": "OK"}
    before = registry.get_sample_value("graft_requests_total", labels) or 0
    _predict(service, inputs={"x": X, "tag": TAGS})
    assert registry.get_sample_value("graft_requests_total", labels) == before + 1
    with pytest.raises(NotFound):
        _predict(service, "ghost", inputs={})
    failed = dict(labels, model="ghost", version="", signature="", code="NOT_FOUND")
    assert registry.get_sample_value("graft_requests_total", failed) >= 1


def test_predict_async_without_batching_matches_and_records(served):
    service, registry = served
    labels = {"model": "two", "version": "1", "signature": "serving_default", "method": "predict",
              "protocol": "grpc", "code": "OK"}
    before = registry.get_sample_value("graft_requests_total", labels) or 0

    async def both():
        return await asyncio.gather(*(service.predict_async(PredictCall(
            model="two", inputs={"x": X + i, "tag": TAGS}, protocol="grpc")) for i in range(3)))

    for i, result in enumerate(asyncio.run(both())):
        assert (result.model, result.version) == ("two", 1)
        np.testing.assert_allclose(result.outputs["y"], models.two_input_expected(X + i), atol=1e-5)
    assert registry.get_sample_value("graft_requests_total", labels) == before + 3


def test_predict_async_batched_deadline_and_cancellation(repo):
    # A long batch timeout keeps a lone request queued: its deadline, or its caller's
    # cancellation, comes first.
    registry = CollectorRegistry()
    config = BatchingConfig(max_batch_size=64, batch_timeout_micros=2_000_000, num_batch_threads=1)
    manager, service = _start(repo, batching=config, metrics=ServingMetrics(registry))
    code = {"model": "two", "version": "1", "signature": "serving_default", "method": "predict",
            "protocol": "grpc"}

    def call(deadline=None):
        return service.predict_async(PredictCall(model="two", inputs={"x": X, "tag": TAGS},
                                                 deadline=deadline, protocol="grpc"))

    async def scenario():
        with pytest.raises(DeadlineExceeded):
            await call(time.monotonic() + 0.1)
        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # gRPC cancels a call when its deadline passes, which may beat the queue's own
        # expiry: a cancellation at or after the deadline counts as DEADLINE_EXCEEDED.
        with pytest.raises(asyncio.CancelledError):
            with service._request("grpc", "predict", "two", deadline=time.monotonic() - 0.001) as record:
                record(1, "serving_default")
                raise asyncio.CancelledError
        # Two concurrent callers share one batch and each gets its own rows.
        first, second = call(), service.predict_async(PredictCall(
            model="two", inputs={"x": X + 1, "tag": TAGS}, protocol="grpc"))
        return await asyncio.gather(first, second)

    try:
        start = time.monotonic()
        first, second = asyncio.run(scenario())
        assert time.monotonic() - start < 5
        np.testing.assert_allclose(first.outputs["y"], models.two_input_expected(X), atol=1e-5)
        np.testing.assert_allclose(second.outputs["y"], models.two_input_expected(X + 1), atol=1e-5)
        for status, count in (("DEADLINE_EXCEEDED", 2), ("CANCELLED", 1), ("OK", 2)):
            assert registry.get_sample_value("graft_requests_total", dict(code, code=status)) == count, status
        assert service.wait_idle(5)
    finally:
        service.begin_drain()
        manager.stop()
        service.close()


def test_batching_drain_and_batcher_cleanup(repo):
    # A long batch timeout keeps requests in the queue, i.e. in flight, for a while.
    config = BatchingConfig(max_batch_size=64, batch_timeout_micros=600_000, num_batch_threads=1)
    manager, service = _start(repo, batching=config)
    try:
        results, errors = [], []

        def call(i):
            try:
                x = X + i
                out = service.predict(PredictCall(model="two", inputs={"x": x, "tag": TAGS}))
                results.append((x, out.outputs["y"]))
            except Exception as exc:  # recorded: the test asserts there are none
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        service.begin_drain()
        assert not service.ready()
        with pytest.raises(Unavailable, match="shutting down") as info:
            service.predict(PredictCall(model="two", inputs={"x": X, "tag": TAGS}))
        assert info.value.retry_after
        assert service.wait_idle(10)
        for t in threads:
            t.join()
        assert errors == [] and len(results) == 4
        for x, y in results:  # each caller got its own rows back from the shared batch
            np.testing.assert_allclose(y, models.two_input_expected(x), atol=1e-5)
        assert any(t.name.startswith("batch_threads-two/1/") for t in threading.enumerate())
        # Removing the model unloads version 1, which must close its batcher threads.
        service.reload_config([ModelConfig("cnn", str(repo / "cnn"))])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                t.name.startswith("batch_threads-two/1/") for t in threading.enumerate()):
            time.sleep(0.05)
        assert not any(t.name.startswith("batch_threads-two/1/") for t in threading.enumerate())
    finally:
        service.begin_drain()
        manager.stop()
        service.close()
