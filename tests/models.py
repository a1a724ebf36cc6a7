"""Builders of the small, real SavedModels every serving test runs against.

These are plain functions, not fixtures: ``tests/conftest.py`` builds each model
once per session and tests copy the directory they need. All models are tiny
(a few KB of weights) but their outputs depend on their inputs, so a wrong
answer cannot pass a comparison by accident.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    input_pb2,
    predict_pb2,
    prediction_log_pb2,
    regression_pb2,
)

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

# The two-input module's fixed parameters, exposed so tests can compute expected outputs.
TWO_INPUT_W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]], dtype=np.float32)
TWO_INPUT_B = np.array([0.1, -0.2], dtype=np.float32)
CLASS_NAMES = (b"neg", b"pos")
WARMUP_FILE = "tf_serving_warmup_requests"


def export_tiny_cnn(path: str | os.PathLike, size: int = 32, num_classes: int = 3, seed: int = 0):
    """Export a small random-weight Conv2D classifier with ``model.export(path)``.

    Signature ``serving_default``: input ``images`` float32 [N, size, size, 3]
    (0..255), output ``output_0`` float32 [N, num_classes] (softmax). Returns the
    Keras model so tests can compare served outputs with ``model.predict``.
    """
    import keras  # late import: the two-input builder does not need Keras

    init = [keras.initializers.GlorotUniform(seed=seed + i) for i in range(4)]
    inputs = keras.Input((size, size, 3), name="images")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=init[0])(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer=init[1])(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", kernel_initializer=init[2])(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init[3])(x)
    model = keras.Model(inputs, outputs, name="tiny_cnn")
    model.export(str(path), verbose=False)
    return model


class _TwoInputModule(tf.Module):
    """A hand-written module with two named inputs and classify/regress signatures."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(TWO_INPUT_W)
        self.b = tf.Variable(TWO_INPUT_B)

    def _logits(self, x):
        return tf.matmul(x, self.w) + self.b

    @staticmethod
    def _parse_x(serialized):
        features = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([3], tf.float32)})
        return features["x"]

    @tf.function(input_signature=[
        tf.TensorSpec([None, 3], tf.float32, name="x"),
        tf.TensorSpec([None], tf.string, name="tag"),
    ])
    def predict(self, x, tag):
        return {
            "y": self._logits(x),
            "tag_len": tf.cast(tf.strings.length(tag), tf.int64),
            "label_bytes": tag,
        }

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def checked(self, x):
        # Fails at run time on negative input: lets tests exercise a model error.
        with tf.control_dependencies([tf.debugging.assert_non_negative(x, message="x must be >= 0")]):
            return {"root": tf.sqrt(x)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(self, inputs):
        scores = tf.nn.softmax(self._logits(self._parse_x(inputs)))
        classes = tf.tile(tf.constant([list(CLASS_NAMES)]), [tf.shape(inputs)[0], 1])
        return {"classes": classes, "scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress(self, inputs):
        return {"outputs": tf.reduce_sum(self._logits(self._parse_x(inputs)), axis=1)}


def export_two_input_module(path: str | os.PathLike) -> None:
    """Export a tf.Module SavedModel with predict, classify and regress signatures.

    Signatures (aliases are the keys tests use):
      - ``serving_default`` (predict): inputs ``x`` float32 [N,3], ``tag`` string [N];
        outputs ``y`` float32 [N,2] = x @ TWO_INPUT_W + TWO_INPUT_B,
        ``tag_len`` int64 [N] (byte length of tag), ``label_bytes`` string [N] (tag echoed).
      - ``checked`` (predict): input ``x`` float32 [N,3]; output ``root`` = sqrt(x);
        raises at run time when any x < 0.
      - ``classify`` (method classify): input ``inputs`` string [N] of serialized
        tf.Example with float feature ``x`` (3 values); outputs ``classes`` string [N,2]
        (``neg``, ``pos``) and ``scores`` float32 [N,2] = softmax(y).
      - ``regress`` (method regress): input ``inputs`` as above; output ``outputs``
        float32 [N] = sum(y).
    """
    module = _TwoInputModule()
    signatures = {
        "serving_default": module.predict.get_concrete_function(),
        "checked": module.checked.get_concrete_function(),
        "classify": module.classify.get_concrete_function(),
        "regress": module.regress.get_concrete_function(),
    }
    tf.saved_model.save(module, str(path), signatures=signatures)
    # TF 2.21 writes every signature as predict; TF Serving's Classify/Regress need these.
    set_method_names(path, {"classify": CLASSIFY_METHOD, "regress": REGRESS_METHOD})


def set_method_names(path: str | os.PathLike, methods: Mapping[str, str]) -> None:
    """Rewrite the ``method_name`` of the named signatures in ``path/saved_model.pb``."""
    pb_path = Path(path) / "saved_model.pb"
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(pb_path.read_bytes())
    for meta_graph in saved.meta_graphs:
        for key, method in methods.items():
            meta_graph.signature_def[key].method_name = method
    pb_path.write_bytes(saved.SerializeToString())


def two_input_expected(x: np.ndarray) -> np.ndarray:
    """The two-input module's ``y`` for input ``x``, computed in numpy."""
    return np.asarray(x, dtype=np.float32) @ TWO_INPUT_W + TWO_INPUT_B


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB image array (0..255) encoded as PNG."""
    # Pillow: only tests that encode images need it.
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(image).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def image_example(data: bytes) -> tf.train.Example:
    """A tf.Example carrying encoded image bytes under ``image/encoded`` (the exported classify signature's feature)."""
    example = tf.train.Example()
    example.features.feature["image/encoded"].bytes_list.value.append(data)
    return example


def make_example(x: Iterable[float]) -> tf.train.Example:
    """A tf.Example with the float feature ``x`` the classify/regress signatures parse."""
    return tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=list(x))),
    }))


def predict_log(inputs: Mapping[str, np.ndarray], signature_name: str = "serving_default",
                model_name: str = "") -> prediction_log_pb2.PredictionLog:
    """A warmup record replaying a Predict request with the given numpy inputs."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def _examples_input(rows: Iterable[Iterable[float]]) -> input_pb2.Input:
    examples = input_pb2.ExampleList(examples=[make_example(r) for r in rows])
    return input_pb2.Input(example_list=examples)


def classify_log(rows: Iterable[Iterable[float]], signature_name: str = "classify") -> prediction_log_pb2.PredictionLog:
    """A warmup record replaying a Classify request over examples built from ``rows``."""
    request = classification_pb2.ClassificationRequest(input=_examples_input(rows))
    request.model_spec.signature_name = signature_name
    return prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=request))


def regress_log(rows: Iterable[Iterable[float]], signature_name: str = "regress") -> prediction_log_pb2.PredictionLog:
    """A warmup record replaying a Regress request over examples built from ``rows``."""
    request = regression_pb2.RegressionRequest(input=_examples_input(rows))
    request.model_spec.signature_name = signature_name
    return prediction_log_pb2.PredictionLog(regress_log=prediction_log_pb2.RegressLog(request=request))


def write_warmup(path_to_version: str | os.PathLike,
                 records: Iterable[prediction_log_pb2.PredictionLog]) -> Path:
    """Write ``records`` as ``<version>/assets.extra/tf_serving_warmup_requests``; return its path."""
    target = Path(path_to_version) / "assets.extra" / WARMUP_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return target


def install_version(src: str | os.PathLike, base_path: str | os.PathLike, version: int) -> Path:
    """Copy the SavedModel ``src`` to ``base_path/<version>`` atomically; return the new dir.

    The copy goes to a hidden temp dir first and is renamed into place, the way the
    exporter publishes versions, so a polling manager never sees it half-written.
    """
    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    target = base / str(version)
    staging = base / f".tmp-{version}-{os.getpid()}"
    shutil.copytree(src, staging)
    os.rename(staging, target)
    return target


def write_model_config(path: Path, models: dict[str, Path], extra: dict[str, str] | None = None) -> Path:
    """Write a TF Serving models.config naming each model's base path (``extra``: text per model)."""
    extra = extra or {}
    entries = "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" {extra.get(name, "")} }}\n'
        for name, base in models.items())
    path.write_text(f"model_config_list {{\n{entries}}}\n")
    return path


def export_shared_trunk_version(repo: str | os.PathLike, model_name: str, *, trunk_seed: int, head_seed: int,
                                size: int = 32, num_classes: int = 3, cut_layer: str | None = None,
                                segments: bool = True) -> str:
    """Export the next version of ``<repo>/<model_name>``: a tiny frozen trunk and a head, split for sharing.

    Goes through training.export with the trunk declaration training.trunk
    computes, so the version carries its trunk's segments
    (``assets.extra/graft-segments``) and ``graft-head`` (graft.contract's shared trunks). Versions exported with the
    same ``trunk_seed`` and ``size`` share one trunk (equal weights, so equal
    fingerprints), whatever their ``head_seed``; another ``trunk_seed`` gives
    another trunk. Inputs are raw 0..255 RGB [N, size, size, 3]; classes are
    ``c0``..``c<num_classes - 1>``; scores vary with the input. Returns the
    version's path.

    The trunk is conv, ``tiny_pool`` (its one block end), conv; ``cut_layer="tiny_pool"``
    cuts it there, so that its one segment is the first of the whole trunk's two.
    ``segments=False`` exports as Graft did before trunks were cut into segments.
    """
    # Late imports: Keras and training's exporter are heavy, and most serving tests need neither.
    import keras

    from training import export, scenarios, trunk
    from training.bases import Backbone, preprocess_layer, truncate
    from training.catalog import BaseSpec
    from training.weights import WeightsReport

    spec = BaseSpec("tiny", "TinyTrunk", "tf", size, 16, ("tiny_pool",), "tiny.weights.h5")
    init = [keras.initializers.GlorotUniform(seed=trunk_seed * 10 + i) for i in range(2)]
    bias = [keras.initializers.RandomUniform(-0.1, 0.1, seed=trunk_seed * 10 + 5 + i) for i in range(2)]
    trunk_inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=init[0], bias_initializer=bias[0])(
        trunk_inputs)
    x = keras.layers.MaxPooling2D(name="tiny_pool")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=init[1], bias_initializer=bias[1])(x)
    trunk_model = keras.Model(trunk_inputs, x, name="tiny_trunk")
    if cut_layer is not None:
        trunk_model = truncate(trunk_model, cut_layer)
    images = keras.Input((size, size, 3), name="images")
    backbone = Backbone(keras.Model(images, trunk_model(preprocess_layer(spec)(images)), name="tiny_backbone"),
                        trunk_model, spec, WeightsReport())

    feature_shape = tuple(backbone.model.output.shape[1:])
    features = keras.Input(feature_shape, name="features")
    y = keras.layers.Flatten()(features)
    scores = keras.layers.Dense(num_classes, activation="softmax",
                                kernel_initializer=keras.initializers.GlorotUniform(seed=head_seed),
                                bias_initializer=keras.initializers.RandomUniform(-0.5, 0.5, seed=head_seed + 1))(y)
    head = keras.Model(features, scores, name="tiny_head")
    model = keras.Model(images, head(backbone.model(images)), name=f"tiny_{model_name}")

    plan = scenarios.plan_for(1, spec)
    lineage = {"base": spec.name, "preprocess": spec.preprocess_mode,
               "weights": {"kind": "none", "path": None, "sha256": None},
               "scenario": plan.describe(), "decision": scenarios.decision_record(plan),
               "trunk": trunk.declaration(backbone, plan, (size, size, 3))}
    if not segments:
        del lineage["trunk"]["segments"]
    parts = (backbone.model, head, trunk.segments(backbone)) if segments else (backbone.model, head)
    return export.export_version(model, [f"c{i}" for i in range(num_classes)], repo, model_name,
                                 image_size=size, lineage=lineage, shared=parts)
