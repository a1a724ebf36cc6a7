"""Servable: loading real SavedModels, signature specs, running, metadata, lineage."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2

from serving.buffers import aligned_empty
from serving.errors import InvalidArgument, NotFound
from graft.contract import CLASSIFY_METHOD, PREDICT_METHOD, REGRESS_METHOD
from serving.servable import (
    Servable,
    TensorSpec,
    _frozen_call,
    _FrozenCall,
    _to_tensor,
    _traced_call,
    tf_signature_defs,
)
from tests import models


@pytest.fixture(scope="module")
def cnn(tiny_cnn_savedmodel):
    return Servable.load("cnn", 1, tiny_cnn_savedmodel)


@pytest.fixture(scope="module")
def two(two_input_savedmodel):
    return Servable.load("two", 7, two_input_savedmodel)


def test_cnn_run_matches_direct_signature_call(cnn, tiny_cnn_savedmodel, tiny_cnn_keras):
    batch = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    out = cnn.run("serving_default", {"images": batch})
    assert set(out) == {"output_0"}
    assert isinstance(out["output_0"], np.ndarray) and out["output_0"].shape == (5, 3)
    direct = tf.saved_model.load(str(tiny_cnn_savedmodel)).signatures["serving_default"]
    expected = direct(images=tf.constant(batch))["output_0"].numpy()
    np.testing.assert_allclose(out["output_0"], expected, atol=1e-5)
    np.testing.assert_allclose(out["output_0"], tiny_cnn_keras.predict(batch, verbose=0), atol=1e-5)
    # Rows differ, so a servable answering the same thing for every input would fail above.
    assert np.abs(out["output_0"][0] - out["output_0"][1]).max() > 1e-4


def test_cnn_signature_specs(cnn):
    assert cnn.name == "cnn" and cnn.version == 1
    assert set(cnn.signatures) == {"serving_default", "serve"}
    sig = cnn.signatures["serving_default"]
    assert sig.name == "serving_default" and sig.method_name == PREDICT_METHOD
    images = sig.inputs["images"]
    assert images.name == "images"
    assert images.dtype == np.float32 and images.tf_dtype == tf.float32
    assert images.shape == (None, 32, 32, 3)
    assert sig.outputs["output_0"].shape == (None, 3)


def test_two_input_specs_and_rewritten_method_names(two):
    assert set(two.signatures) == {"serving_default", "checked", "classify", "regress"}
    assert two.signatures["serving_default"].method_name == PREDICT_METHOD
    assert two.signatures["classify"].method_name == CLASSIFY_METHOD
    assert two.signatures["regress"].method_name == REGRESS_METHOD
    predict = two.signatures["serving_default"]
    assert set(predict.inputs) == {"x", "tag"}
    assert predict.inputs["tag"].dtype == np.dtype(object) and predict.inputs["tag"].tf_dtype == tf.string
    assert predict.inputs["tag"].shape == (None,)
    assert predict.outputs["tag_len"].dtype == np.int64
    assert predict.outputs["label_bytes"].tf_dtype == tf.string
    assert set(two.signatures["classify"].outputs) == {"classes", "scores"}
    assert set(two.signatures["regress"].outputs) == {"outputs"}


def test_two_input_run_predict_classify_regress(two):
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=np.float32)
    tag = np.array([b"ab", b"\xff\x00z"], dtype=object)
    out = two.run("serving_default", {"x": x, "tag": tag})
    np.testing.assert_allclose(out["y"], models.two_input_expected(x), atol=1e-5)
    assert out["tag_len"].tolist() == [2, 3]
    assert out["label_bytes"].tolist() == [b"ab", b"\xff\x00z"]

    serialized = np.array([models.make_example(r).SerializeToString() for r in x], dtype=object)
    y = models.two_input_expected(x)
    cls = two.run("classify", {"inputs": serialized})
    expected_scores = np.exp(y) / np.exp(y).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(cls["scores"], expected_scores, atol=1e-5)
    assert cls["classes"].tolist() == [[b"neg", b"pos"]] * 2
    reg = two.run("regress", {"inputs": serialized})
    np.testing.assert_allclose(reg["outputs"], y.sum(axis=1), atol=1e-5)


def test_run_errors(two):
    with pytest.raises(NotFound, match="nope"):
        two.run("nope", {})
    # A model-side assertion is the client's fault: INVALID_ARGUMENT, with TF's message.
    with pytest.raises(InvalidArgument, match="x must be >= 0") as info:
        two.run("checked", {"x": np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)})
    assert "Detected at node" not in str(info.value)
    with pytest.raises(InvalidArgument):
        two.run("checked", {"x": np.zeros((1, 3), np.float32), "extra": np.zeros(1)})
    with pytest.raises(InvalidArgument):
        two.run("serving_default", {"x": np.zeros((1, 3), np.float32)})  # tag missing
    with pytest.raises(InvalidArgument, match="'x' cannot be converted to float32"):
        two.run("checked", {"x": np.array([["a", "b", "c"]], dtype=object)})
    ok = two.run("checked", {"x": np.array([[4.0, 9.0, 0.0]], dtype=np.float32)})
    np.testing.assert_allclose(ok["root"], [[2.0, 3.0, 0.0]])


def test_signature_def_map_is_tf_serving_message(two):
    sig_map = two.signature_def_map()
    assert isinstance(sig_map, get_model_metadata_pb2.SignatureDefMap)
    assert set(sig_map.signature_def) == {"serving_default", "checked", "classify", "regress"}
    assert sig_map.signature_def["classify"].method_name == CLASSIFY_METHOD
    assert sig_map.signature_def["serving_default"].inputs["x"].dtype == tf.float32.as_datatype_enum
    # Callers may mutate the message they get; the servable's copy must not change.
    sig_map.signature_def["classify"].method_name = "changed"
    assert two.signature_def_map().signature_def["classify"].method_name == CLASSIFY_METHOD


def test_lineage(tmp_path, two_input_savedmodel, two):
    assert two.lineage() is None
    version = tmp_path / "3"
    shutil.copytree(two_input_savedmodel, version)
    record = {"base": "tiny", "scenario": "fine_tune", "metrics": {"accuracy": 0.5}}
    (version / "assets.extra").mkdir()
    (version / "assets.extra" / "graft.json").write_text(json.dumps(record))
    servable = Servable.load("two", 3, version)
    assert servable.lineage() == record
    servable.lineage()["base"] = "mutated"
    assert servable.lineage() == record
    (version / "assets.extra" / "graft.json").write_text("{not json")
    assert Servable.load("two", 3, version).lineage() is None


def test_runs_go_through_traced_wrappers_with_the_same_answers(two):
    replica = two._pool.replicas[0]
    assert set(replica.calls) == set(replica.functions) == set(two.signatures)
    x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    inputs = {"x": x, "tag": np.array([b"a", b"bc", b"", b"def"], dtype=object)}
    for name in two.signatures:
        # Wrappers, not the restored signatures (whose calls map every variable in Python).
        assert replica.calls[name] is not replica.functions[name]
    direct = replica.functions["serving_default"](x=tf.constant(x), tag=tf.constant(inputs["tag"].tolist()))
    out = two.run("serving_default", inputs)
    assert set(out) == set(direct)
    for name, value in direct.items():
        np.testing.assert_array_equal(out[name], value.numpy())
    # A run-time failure inside the model still surfaces through the wrapper.
    with pytest.raises(InvalidArgument, match="x must be >= 0"):
        two.run("checked", {"x": -np.ones((1, 3), np.float32)})


def test_frozen_and_unfrozen_versions_give_the_same_answers(two_input_savedmodel, two):
    unfrozen = Servable.load("two", 7, two_input_savedmodel, freeze=False)
    for name in two.signatures:
        assert isinstance(two._pool.replicas[0].calls[name], _FrozenCall)
        assert not isinstance(unfrozen._pool.replicas[0].calls[name], _FrozenCall)
    x = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
    tags = np.array([b"a", b"bc", b"", b"def", b"\x00", b"long tag"], dtype=object)
    examples = np.array([models.make_example(row).SerializeToString() for row in x], dtype=object)
    cases = {"serving_default": {"x": x, "tag": tags}, "checked": {"x": np.abs(x)},
             "classify": {"inputs": examples}, "regress": {"inputs": examples}}
    for name, inputs in cases.items():
        frozen_out, unfrozen_out = two.run(name, inputs), unfrozen.run(name, inputs)
        assert set(frozen_out) == set(unfrozen_out) == set(two.signatures[name].outputs)
        for key, value in unfrozen_out.items():
            if value.dtype == object:
                np.testing.assert_array_equal(frozen_out[key], value)
            else:
                np.testing.assert_allclose(frozen_out[key], value, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two.run("serving_default", cases["serving_default"])["y"],
                               models.two_input_expected(x), rtol=1e-5, atol=1e-5)


def test_a_frozen_call_rejects_inputs_that_do_not_match(two):
    call = two._pool.replicas[0].calls["serving_default"]
    x, tag = tf.constant(np.ones((2, 3), np.float32)), tf.constant([b"a", b"b"])
    assert set(call(x=x, tag=tag)) == {"y", "tag_len", "label_bytes"}
    with pytest.raises(TypeError, match="expected inputs"):
        call(x=x)
    with pytest.raises(TypeError, match="expected inputs"):
        call(x=x, tags=tag)
    with pytest.raises(TypeError, match="'x' must be float32"):
        call(x=tf.constant(np.ones((2, 3), np.float64)), tag=tag)
    with pytest.raises(TypeError, match="'x' must be float32"):
        call(x=tf.constant(np.ones((2, 4), np.float32)), tag=tag)


class _Counter(tf.Module):
    """A signature that writes its variable: each call adds its input's sum to a running total."""

    def __init__(self):
        super().__init__()
        self.total = tf.Variable(0.0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def add(self, x):
        self.total.assign_add(tf.reduce_sum(x))
        return {"total": tf.reshape(self.total.read_value(), [1])}


def test_a_signature_that_writes_its_variables_is_not_frozen(tmp_path, caplog):
    module = _Counter()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.add})
    with caplog.at_level("INFO", logger="serving.servable"):
        servable = Servable.load("counter", 1, tmp_path / "1")
    assert not isinstance(servable._pool.replicas[0].calls["serving_default"], _FrozenCall)
    assert "AssignAddVariableOp" in caplog.text and "served unfrozen" in caplog.text
    # Its state carries from call to call, as in the SavedModel.
    assert servable.run("serving_default", {"x": np.array([1, 2], np.float32)})["total"].tolist() == [3.0]
    assert servable.run("serving_default", {"x": np.array([4], np.float32)})["total"].tolist() == [7.0]


def test_a_signature_whose_freezing_fails_is_served_traced(two_input_savedmodel, monkeypatch, caplog):
    def refuse(self, traced):
        raise ValueError("converter refused")

    monkeypatch.setattr(_FrozenCall, "__init__", refuse)
    with caplog.at_level("WARNING", logger="serving.servable"):
        servable = Servable.load("two", 7, two_input_savedmodel)
    assert "freezing its variables failed: converter refused" in caplog.text
    call = servable._pool.replicas[0].calls["serving_default"]
    assert not isinstance(call, _FrozenCall) and call is not servable._pool.replicas[0].functions["serving_default"]
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(servable.run("serving_default", {"x": x, "tag": np.array([b"a", b"b"], object)})["y"],
                               models.two_input_expected(x), rtol=1e-5)
    opaque = object()
    assert _frozen_call(opaque, "opaque", None) is opaque


def test_an_aligned_batch_is_shared_with_tensorflow_and_anything_else_copied(two):
    spec = TensorSpec("x", np.dtype(np.float32), tf.float32, (None, 3))
    shared = aligned_empty((4, 3), np.float32)
    shared[...] = 1.0
    tensor = _to_tensor(shared, spec)
    shared[0, 0] = 5.0  # the batcher never does this; it shows the memory is the array's own
    assert float(tensor[0, 0]) == 5.0
    copied_from = np.ones((4, 3), np.float32)[:, :]
    copied_from = np.frombuffer(copied_from.tobytes(), np.float32).reshape(4, 3)  # read-only, as from a request
    tensor = _to_tensor(copied_from, spec)
    assert float(tensor[0, 0]) == 1.0
    # Other dtypes convert; the answers do not depend on the path.
    assert _to_tensor(np.ones((2, 3), np.float64), spec).dtype == tf.float32
    x = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    aligned = aligned_empty(x.shape, np.float32)
    aligned[...] = x
    tags = np.array([b"a", b"b", b"c", b"d"], dtype=object)
    np.testing.assert_array_equal(two.run("serving_default", {"x": aligned, "tag": tags})["y"],
                                  two.run("serving_default", {"x": x.copy(), "tag": tags})["y"])


def test_an_untraceable_signature_is_called_as_it_is():
    class Opaque:
        structured_input_signature = ((), {"x": "not a TensorSpec"})

        def __call__(self, **inputs):
            raise AssertionError("tracing must not call it with these specs")

    opaque = Opaque()
    assert _traced_call(opaque, None) is opaque


def test_device_placement_and_unload(tiny_cnn_savedmodel):
    servable = Servable.load("cnn", 2, tiny_cnn_savedmodel, device="/CPU:0")
    batch = np.zeros((1, 32, 32, 3), np.float32)
    assert servable.run("serving_default", {"images": batch})["output_0"].shape == (1, 3)
    servable.unload()
    with pytest.raises(NotFound):
        servable.run("serving_default", {"images": batch})


def test_bad_saved_model_files(tmp_path, two_input_savedmodel):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "saved_model.pb").write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(ValueError, match="not a valid SavedModel"):
        Servable.load("bad", 1, garbage)

    broken_vars = tmp_path / "broken_vars"
    shutil.copytree(two_input_savedmodel, broken_vars)
    for f in (broken_vars / "variables").iterdir():
        f.write_bytes(b"corrupt")
    with pytest.raises(Exception):
        Servable.load("bad", 1, broken_vars)

    assert set(tf_signature_defs(two_input_savedmodel)) == {"serving_default", "checked", "classify", "regress"}
