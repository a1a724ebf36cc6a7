"""Export a trained classifier as the next version of a TF-Serving model repository.

The SavedModel carries three signatures (docs/internals.md, "export contract"):

- ``serving_default``: ``images`` float32 [N,H,W,3] raw 0..255 -> ``scores`` [N,C],
  ``class_ids`` int64 [N], ``class_names`` string [N];
- ``predict_images``: ``image_bytes`` string [N] (JPEG/PNG/GIF/BMP) decoded and resized
  in the graph -> the same outputs;
- ``classify``: TF Serving's classify method, ``inputs`` = serialized tf.Example with
  ``image/encoded`` -> ``classes`` string [N,C], ``scores`` float32 [N,C].

It also writes the class names, the lineage and the warmup requests where
graft.contract puts them, and for a frozen-trunk version its trunk (cut into
segments) and head as more SavedModels (graft.contract's shared trunks), so that
a server can run one trunk for many heads. Everything is written into a hidden staging directory
and renamed into place as one step (training.repo).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from graft import contract
from training import repo as model_repo
from training.data import decode_and_resize, image_hw

# The tf.Example feature the classify signature reads the encoded image from.
IMAGE_FEATURE = "image/encoded"
SIGNATURE_METHODS = {
    "serving_default": contract.PREDICT_METHOD,
    "predict_images": contract.PREDICT_METHOD,
    "classify": contract.CLASSIFY_METHOD,
}
# Enough to trace the common batch shapes without slowing every load.
WARMUP_BATCH_SIZES = (1, 4)
_PACKAGES = ("graft", "tensorflow", "keras", "numpy", "tensorflow-serving-api")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape an exported model."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class _Signatures:
    """Builds the three endpoint functions around one Keras model."""

    def __init__(self, model: keras.Model, class_names: Sequence[str], height: int, width: int):
        self.model = model
        self.class_names = [str(name) for name in class_names]
        self.height = height
        self.width = width

    def _scores(self, images: tf.Tensor) -> tf.Tensor:
        # Mixed-precision models may compute in float16; the contract is float32.
        return tf.cast(self.model(images, training=False), tf.float32)

    def _outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        scores = self._scores(images)
        class_ids = tf.argmax(scores, axis=-1, output_type=tf.int64)
        names = tf.gather(tf.constant(self.class_names, dtype=tf.string), class_ids)
        return {"scores": scores, "class_ids": class_ids, "class_names": names}

    def _decode_batch(self, image_bytes: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(
            # Training's own decoding rule, so served images see the pixels training saw.
            lambda data: decode_and_resize(data, (self.height, self.width)),
            image_bytes,
            fn_output_signature=tf.TensorSpec([self.height, self.width, 3], tf.float32),
        )

    def functions(self) -> dict[str, tf.types.experimental.GenericFunction]:
        """The endpoint name -> tf.function map, each with its input signature."""
        h, w = self.height, self.width

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="images")])
        def serving_default(images):
            return self._outputs(images)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def predict_images(image_bytes):
            return self._outputs(self._decode_batch(image_bytes))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(inputs):
            features = tf.io.parse_example(
                inputs, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
            scores = self._scores(self._decode_batch(features[IMAGE_FEATURE]))
            names = tf.constant(self.class_names, dtype=tf.string)
            classes = tf.tile(names[tf.newaxis, :], [tf.shape(scores)[0], 1])
            return {"classes": classes, "scores": scores}

        return {
            "serving_default": serving_default,
            "predict_images": predict_images,
            "classify": classify,
        }

    def trunk_functions(self) -> dict[str, tf.types.experimental.GenericFunction]:
        """The trunk's endpoints (``contract.SHARED_SIGNATURES``): each version signature's inputs -> features.

        ``self.model`` is the trunk here: what runs before the head, preprocessing included.
        """
        h, w = self.height, self.width

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="images")])
        def images(images):
            return {contract.FEATURES_KEY: self._scores(images)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def image_bytes(image_bytes):
            return {contract.FEATURES_KEY: self._scores(self._decode_batch(image_bytes))}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def examples(inputs):
            features = tf.io.parse_example(
                inputs, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
            return {contract.FEATURES_KEY: self._scores(self._decode_batch(features[IMAGE_FEATURE]))}

        by_version = {"serving_default": images, "predict_images": image_bytes, "classify": examples}
        return {contract.SHARED_SIGNATURES[name]: fn for name, fn in by_version.items()}

    def head_functions(self, feature_shape: Sequence[int]) -> dict[str, tf.types.experimental.GenericFunction]:
        """The head's endpoints, named as the version's: features -> that signature's outputs.

        ``self.model`` is the head here; ``feature_shape`` is the trunk's output without its batch axis.
        """
        spec = tf.TensorSpec([None, *feature_shape], tf.float32, name=contract.FEATURES_KEY)

        @tf.function(input_signature=[spec])
        def serving_default(features):
            return self._outputs(features)

        @tf.function(input_signature=[spec])
        def predict_images(features):
            return self._outputs(features)

        @tf.function(input_signature=[spec])
        def classify(features):
            scores = self._scores(features)
            names = tf.constant(self.class_names, dtype=tf.string)
            classes = tf.tile(names[tf.newaxis, :], [tf.shape(scores)[0], 1])
            return {"classes": classes, "scores": scores}

        return {"serving_default": serving_default, "predict_images": predict_images, "classify": classify}

    def segment_functions(self, feature_shape: Sequence[int]) -> dict[str, tf.types.experimental.GenericFunction]:
        """A later trunk segment's one endpoint (``contract.SEGMENT_SIGNATURE``): the features before it -> its own.

        ``self.model`` is the segment here; ``feature_shape`` is its input without the batch axis.
        """
        @tf.function(input_signature=[tf.TensorSpec([None, *feature_shape], tf.float32,
                                                     name=contract.FEATURES_KEY)])
        def segment(features):
            return {contract.FEATURES_KEY: self._scores(features)}

        return {contract.SEGMENT_SIGNATURE: segment}


def _output_shape(model: keras.Model, inputs: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in model(inputs, training=False).shape[1:])


def write_shared_parts(version_dir: str | os.PathLike, trunk: keras.Model, head: keras.Model,
                       class_names: Sequence[str], height: int, width: int,
                       segments: Sequence[keras.Model] = ()) -> list[Path]:
    """Write a frozen-trunk version's trunk and head apart, as graft.contract's SavedModels; their paths.

    ``trunk`` maps raw 0..255 RGB float32 [N,H,W,3] to features and ``head``
    features to class probabilities, so that the version's model is
    ``head(trunk(x))``. A server may load the trunk once for every version with
    the same fingerprint and each version's head alone. ``segments`` (from
    ``training.trunk.segments``) chain to ``trunk``: given, the trunk is written as
    them (graft.contract's segments), else whole (``contract.trunk_model_path``).
    """
    images = np.zeros((1, height, width, 3), np.float32)
    feature_shape = _output_shape(trunk, images)
    parts = [(contract.head_model_path(version_dir),
              _Signatures(head, class_names, height, width).head_functions(feature_shape))]
    trunks = []
    if not segments:
        trunks.append(contract.trunk_model_path(version_dir))
        parts.append((trunks[0], _Signatures(trunk, class_names, height, width).trunk_functions()))
    features = images
    for index, segment in enumerate(segments):
        signatures = _Signatures(segment, class_names, height, width)
        trunks.append(contract.segment_model_path(version_dir, index))
        parts.append((trunks[-1],
                      signatures.trunk_functions() if index == 0 else signatures.segment_functions(features.shape[1:])))
        features = np.asarray(segment(features, training=False), np.float32)
    if segments and features.shape[1:] != feature_shape:
        raise ValueError(f"the segments end in features {features.shape[1:]}, the trunk in {feature_shape}")
    for path, functions in parts:
        path.parent.mkdir(parents=True, exist_ok=True)
        _archive(functions).write_out(str(path), verbose=False)
    for path in trunks:
        _drop_default_alias(path)
    contract.set_method_names(parts[0][0], {name: method for name, method in SIGNATURE_METHODS.items()
                                            if method != contract.PREDICT_METHOD})
    return [parts[0][0], *trunks]


def _archive(functions: Mapping[str, tf.types.experimental.GenericFunction]) -> keras.export.ExportArchive:
    """An ExportArchive of ``functions`` as its endpoints.

    The model is not ``track``ed: the archive already keeps the variables the endpoints
    capture, and tracking the model as well stores every weight twice (Keras wraps each
    ``tf.Variable``, and the two objects do not deduplicate; keras-team/keras#23553),
    which doubles the files and every loaded copy's variables.
    """
    archive = keras.export.ExportArchive()
    for name, fn in functions.items():
        archive.add_endpoint(name, fn)
    return archive


def _drop_default_alias(saved_model_dir: Path) -> None:
    # Keras' ExportArchive adds "serving_default" as an alias of the first endpoint;
    # the trunk's signatures are exactly contract.SHARED_SIGNATURES' names.
    if "serving_default" in contract.SHARED_SIGNATURES.values():
        return
    saved = contract.read_saved_model(saved_model_dir)
    for meta_graph in saved.meta_graphs:
        meta_graph.signature_def.pop("serving_default", None)
    (saved_model_dir / contract.SAVED_MODEL_FILE).write_bytes(saved.SerializeToString())


def write_warmup_requests(path: str | os.PathLike, model_name: str, images: np.ndarray) -> int:
    """Write PredictionLog records for ``serving_default`` (TF Serving's warmup format).

    One record per batch size in WARMUP_BATCH_SIZES (capped by the images given);
    returns the number written.
    """
    images = np.asarray(images, dtype=np.float32)
    sizes = sorted({min(size, len(images)) for size in WARMUP_BATCH_SIZES if len(images)})
    with tf.io.TFRecordWriter(str(path)) as writer:
        for size in sizes:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default"))
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(images[:size]))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return len(sizes)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, _dt.datetime)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _check_model(model: keras.Model, class_names: Sequence[str], height: int, width: int) -> None:
    if len(class_names) < 2:
        raise ValueError(f"a classifier needs at least 2 class names, got {list(class_names)}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {list(class_names)}")
    if any(not str(name) or "\n" in str(name) for name in class_names):
        raise ValueError("class names must be non-empty single-line strings")
    probe = model(np.zeros((1, height, width, 3), np.float32), training=False)
    if probe.shape[-1] != len(class_names):
        raise ValueError(
            f"the model outputs {probe.shape[-1]} scores but {len(class_names)} class names were given")


def export_version(
    model: keras.Model,
    class_names: Sequence[str],
    repo: str | os.PathLike,
    model_name: str,
    *,
    image_size: int | Sequence[int],
    lineage: Mapping,
    warmup_images: np.ndarray | None = None,
    shared: tuple[keras.Model, ...] | None = None,
    before_publish: Callable[[Path], None] | None = None,
) -> str:
    """Write ``model`` as the next version of ``<repo>/<model_name>`` and return its path.

    ``model`` maps raw 0..255 RGB float32 [N,H,W,3] to class probabilities.
    ``lineage`` (fields of graft.contract's lineage schema) is stored as the
    version's lineage with ``class_names``, ``model_name``, ``image_size``,
    ``signatures``, ``package_versions`` and ``created_at`` added (the version
    is the directory name, known only at publish); ValueError when a field
    breaks the schema. ``warmup_images`` (float32 [K,H,W,3]) feed the warmup
    records; when None, mid-grey images are used. ``before_publish`` runs with
    the staging directory once the version is complete and still hidden (the
    pipeline writes the run's report into ``contract.report_path`` there), so
    what it adds appears with the version, in the same rename.
    ``shared`` is ``(trunk, head)`` or ``(trunk, head, segments)`` with
    ``model(x) == head(trunk(x))``, ``segments`` as many as the declaration lists: given
    exactly when ``lineage`` declares a trunk, it is also written as the
    SavedModels of graft.contract's shared trunks (:func:`write_shared_parts`),
    inside the same staging directory.
    """
    height, width = image_hw(image_size)
    class_names = [str(name) for name in class_names]
    _check_model(model, class_names, height, width)
    if (shared is None) != (contract.trunk_of(lineage) is None):
        # graft.contract: a version declares its trunk exactly when it carries the split.
        raise ValueError("a lineage that declares a trunk needs shared=(trunk, head), and only such a lineage")
    declared_segments = len((contract.trunk_of(lineage) or {}).get("segments") or [])
    if shared is not None and len(shared[2] if len(shared) > 2 else ()) != declared_segments:
        raise ValueError(f"the lineage declares {declared_segments} trunk segment(s); shared=(trunk, head, "
                         f"segments) must carry as many models")
    target_dir = model_repo.model_dir(repo, model_name)

    archive = _archive(_Signatures(model, class_names, height, width).functions())

    if warmup_images is None:
        warmup_images = np.full((max(WARMUP_BATCH_SIZES), height, width, 3), 128.0, np.float32)
    warmup_images = np.asarray(warmup_images, np.float32)
    if warmup_images.ndim != 4 or warmup_images.shape[1:] != (height, width, 3):
        raise ValueError(f"warmup images must be [K,{height},{width},3], got {warmup_images.shape}")

    # Checked against the schema before anything is written.
    record = contract.new_lineage(**{
        **lineage,
        "model_name": model_name,
        "class_names": class_names,
        "image_size": [height, width],
        "signatures": dict(SIGNATURE_METHODS),
        "package_versions": package_versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })

    with model_repo.staging_dir(target_dir) as tmp:
        archive.write_out(str(tmp), verbose=False)
        # Exporters write the predict method for every signature; TF Serving's Classify API needs its own.
        contract.set_method_names(tmp, {name: method for name, method in SIGNATURE_METHODS.items()
                                        if method != contract.PREDICT_METHOD})
        labels_txt = contract.class_names_path(tmp)
        labels_txt.parent.mkdir(exist_ok=True)
        labels_txt.write_text("\n".join(class_names) + "\n", encoding="utf-8")
        contract.warmup_path(tmp).parent.mkdir(exist_ok=True)
        write_warmup_requests(contract.warmup_path(tmp), model_name, warmup_images)
        contract.lineage_path(tmp).write_text(
            json.dumps(record, indent=2, default=_json_default), encoding="utf-8")
        if shared is not None:
            write_shared_parts(tmp, shared[0], shared[1], class_names, height, width,
                               segments=shared[2] if len(shared) > 2 else ())
        if before_publish is not None:
            before_publish(Path(tmp))
        _, path = model_repo.publish_dir(tmp, target_dir)
    return str(path)
