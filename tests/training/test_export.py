"""Tests for training.export: signatures, files, warmup records, method names, serving load."""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from graft import contract
from serving import servable as servable_module
from tests.models import image_example, png_bytes
from training import export, repo

SIZE = 32
CLASSES = ["circle", "square", "stripe"]


def _tiny_model(seed=0):
    init = [keras.initializers.GlorotUniform(seed=seed + i) for i in range(3)]
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=init[0])(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=init[1])(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", kernel_initializer=init[2])(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (6, SIZE, SIZE, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images):
    model = _tiny_model()
    scores = model(images.astype(np.float32), training=False).numpy()
    # Guard against a degenerate model: a wrong export could then still "match".
    assert np.ptp(scores, axis=0).max() > 1e-3
    assert len(set(scores.argmax(axis=1))) > 1 or np.ptp(scores) > 1e-2
    repo_dir = tmp_path_factory.mktemp("repo")
    lineage = {"base": "tiny", "weights": {"kind": "none", "sha256": None}, "scenario": {"id": 1}}
    path = export.export_version(model, CLASSES, repo_dir, "shapes", image_size=SIZE,
                                 lineage=lineage, warmup_images=images[:5].astype(np.float32))
    return model, repo_dir, path


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported[2])


def test_layout_and_lineage(exported):
    _, repo_dir, path = exported
    version = repo_dir / "shapes" / "1"
    assert path == str(version)
    for name in ("saved_model.pb", "variables/variables.index", "assets/labels.txt",
                 "assets.extra/graft.json", "assets.extra/tf_serving_warmup_requests"):
        assert (version / name).is_file(), name
    assert (version / "assets" / "labels.txt").read_text().splitlines() == CLASSES
    lineage = json.loads((version / "assets.extra" / "graft.json").read_text())
    assert lineage["base"] == "tiny" and lineage["scenario"] == {"id": 1}
    assert lineage["class_names"] == CLASSES and lineage["image_size"] == [SIZE, SIZE]
    assert lineage["signatures"]["classify"] == contract.CLASSIFY_METHOD
    assert {"tensorflow", "keras", "python"} <= set(lineage["package_versions"])
    assert lineage["created_at"].endswith("+00:00")
    # Written through the contract's schema, and read back by its validating reader.
    assert lineage["schema_version"] == contract.LINEAGE_SCHEMA_VERSION
    assert contract.read_lineage(version) == lineage
    # Nothing but the version (and the hidden publish lock) is left in the model directory.
    assert [p.name for p in (repo_dir / "shapes").iterdir() if not p.name.startswith(".")] == ["1"]
    assert not [p for p in (repo_dir / "shapes").iterdir() if p.name.startswith(contract.TEMP_PREFIX)]


def test_every_weight_is_stored_once(exported):
    model, _, path = exported
    stored = [shape for name, shape in tf.train.list_variables(str(Path(path) / "variables" / "variables"))
              if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert sum(int(np.prod(shape)) for shape in stored) == model.count_params()


def test_method_names_in_saved_model_pb(exported):
    saved = saved_model_pb2.SavedModel()
    with open(exported[2] + "/saved_model.pb", "rb") as handle:
        saved.ParseFromString(handle.read())
    signatures = saved.meta_graphs[0].signature_def
    assert signatures["classify"].method_name == "tensorflow/serving/classify"
    assert signatures["serving_default"].method_name == "tensorflow/serving/predict"
    assert signatures["predict_images"].method_name == "tensorflow/serving/predict"
    assert set(signatures["classify"].inputs) == {"inputs"}
    assert set(signatures["classify"].outputs) == {"classes", "scores"}
    assert set(signatures["serving_default"].inputs) == {"images"}
    assert set(signatures["predict_images"].inputs) == {"image_bytes"}


def test_serving_default_matches_keras(exported, loaded, images):
    model = exported[0]
    x = images.astype(np.float32)
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    expected = model(x, training=False).numpy()
    np.testing.assert_allclose(out["scores"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out["class_ids"].numpy(), expected.argmax(axis=1))
    assert out["class_ids"].dtype == tf.int64
    assert [n.decode() for n in out["class_names"].numpy()] == [CLASSES[i] for i in expected.argmax(axis=1)]


def test_predict_images_decodes_png_like_numpy(exported, loaded, images):
    model = exported[0]
    pngs = [png_bytes(img) for img in images]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), np.float32) for p in pngs])
    out = loaded.signatures["predict_images"](image_bytes=tf.constant(pngs))
    np.testing.assert_allclose(out["scores"].numpy(), model(decoded, training=False).numpy(), atol=1e-5)
    # A larger image is resized in the graph: same as bilinear resizing before the model.
    big = np.random.default_rng(1).integers(0, 256, (48, 40, 3)).astype(np.uint8)
    out = loaded.signatures["predict_images"](image_bytes=tf.constant([png_bytes(big)]))
    resized = tf.image.resize(big.astype(np.float32)[None], [SIZE, SIZE]).numpy()
    np.testing.assert_allclose(out["scores"].numpy(), model(resized, training=False).numpy(), atol=1e-5)


def test_classify_matches_keras(exported, loaded, images):
    model = exported[0]
    examples = [image_example(png_bytes(img)).SerializeToString() for img in images[:3]]
    out = loaded.signatures["classify"](inputs=tf.constant(examples))
    expected = model(images[:3].astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(out["scores"].numpy(), expected, atol=1e-5)
    assert out["classes"].numpy().tolist() == [[c.encode() for c in CLASSES]] * 3


def test_warmup_records_replay(exported, loaded, images):
    path = exported[2] + "/assets.extra/tf_serving_warmup_requests"
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    assert [r.WhichOneof("log_type") for r in records] == ["predict_log", "predict_log"]
    sizes = []
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert request.model_spec.name == "shapes"
        batch = tf.make_ndarray(request.inputs["images"])
        sizes.append(batch.shape[0])
        np.testing.assert_array_equal(batch, images[:batch.shape[0]].astype(np.float32))
        assert loaded.signatures["serving_default"](images=tf.constant(batch))["scores"].shape == (batch.shape[0], 3)
    assert sizes == [1, 4]


def test_second_export_is_version_two_and_bad_inputs_leave_nothing(exported, tmp_path):
    model, repo_dir, _ = exported
    with pytest.raises(ValueError, match="3 scores but 2 class names"):
        export.export_version(model, CLASSES[:2], repo_dir, "shapes", image_size=SIZE, lineage={})
    with pytest.raises(ValueError, match="warmup"):
        export.export_version(model, CLASSES, repo_dir, "shapes", image_size=SIZE, lineage={},
                              warmup_images=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="'metrics' must be"):
        export.export_version(model, CLASSES, repo_dir, "shapes", image_size=SIZE, lineage={"metrics": []})
    assert repo.list_versions(repo_dir / "shapes") == [1]
    path = export.export_version(model, CLASSES, repo_dir, "shapes", image_size=(SIZE, SIZE), lineage={})
    assert path.endswith("/shapes/2")
    assert not [p for p in (repo_dir / "shapes").iterdir() if p.name.startswith(contract.TEMP_PREFIX)]


def test_serving_loads_the_version(exported, images):
    model, _, path = exported
    servable = servable_module.Servable.load("shapes", 1, path)
    try:
        assert set(servable.signatures) >= {"serving_default", "predict_images", "classify"}
        assert servable.signatures["classify"].method_name == "tensorflow/serving/classify"
        out = servable.run("serving_default", {"images": images[:2].astype(np.float32)})
        np.testing.assert_allclose(out["scores"], model(images[:2].astype(np.float32)).numpy(), atol=1e-5)
        out = servable.run("predict_images", {"image_bytes": np.array([png_bytes(images[0])], dtype=object)})
        assert out["scores"].shape == (1, 3)
        assert servable.lineage()["base"] == "tiny"
    finally:
        servable.unload()
