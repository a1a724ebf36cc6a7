"""Evaluate an exported SavedModel version on a labelled image set, and time it.

Evaluation goes through the SavedModel's own signatures (``tf.saved_model.load``),
never the Keras object, so it measures exactly what graft-serve will serve. The
promotion gate reuses :func:`evaluate_savedmodel` and :func:`measure_latency`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from graft import contract
from training import data
from training.export import IMAGE_FEATURE

SIGNATURES = ("serving_default", "predict_images", "classify")


@dataclasses.dataclass
class EvalResult:
    """Scores of one model on one labelled image set.

    ``confusion[i, j]`` counts images of true class ``class_names[i]`` predicted as
    ``class_names[j]`` (the model's classes and order). ``labels`` and
    ``predictions`` are indices into ``class_names``, one per file in ``files``;
    ``scores`` holds the model's probabilities [N, C].
    """

    accuracy: float
    class_names: list[str]
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    scores: np.ndarray
    files: list[str]
    signature: str = "serving_default"

    @property
    def count(self) -> int:
        """Number of images evaluated."""
        return int(len(self.labels))

    def to_dict(self) -> dict:
        """A JSON-ready summary (no per-image scores)."""
        return {
            "accuracy": self.accuracy,
            "count": self.count,
            "signature": self.signature,
            "class_names": list(self.class_names),
            "per_class": self.per_class,
            "confusion": self.confusion.tolist(),
        }


def classification_metrics(labels: Sequence[int], predictions: Sequence[int],
                           class_names: Sequence[str]) -> tuple[float, dict, np.ndarray]:
    """Accuracy, per-class precision/recall/support, and the confusion matrix.

    Precision of a class never predicted, and recall of a class absent from the
    labels, are reported as 0.0 (scikit-learn's ``zero_division=0``).
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions")
    num = len(class_names)
    confusion = np.zeros((num, num), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    correct = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    per_class = {}
    for i, name in enumerate(class_names):
        per_class[str(name)] = {
            "precision": float(correct[i] / predicted[i]) if predicted[i] else 0.0,
            "recall": float(correct[i] / support[i]) if support[i] else 0.0,
            "support": int(support[i]),
        }
    accuracy = float(correct.sum() / len(labels)) if len(labels) else 0.0
    return accuracy, per_class, confusion


def _signature_image_size(signature) -> tuple[int, int]:
    spec = signature.structured_input_signature[1]["images"]
    height, width = spec.shape[1], spec.shape[2]
    if height is None or width is None:
        raise ValueError("the serving_default signature has no fixed image size")
    return int(height), int(width)


def _example(encoded: bytes) -> bytes:
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
    example = tf.train.Example(features=tf.train.Features(feature={IMAGE_FEATURE: feature}))
    return example.SerializeToString()


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _scores_from_float_images(loaded, images, batch_size: int) -> np.ndarray:
    fn = loaded.signatures["serving_default"]
    size = _signature_image_size(fn)
    # Decoded exactly as training does, so differences measure the model, not the loader.
    dataset = data.make_dataset(images, size, batch_size, training=False, seed=0, augment=False, cache=False)
    parts = [fn(images=batch)["scores"].numpy() for batch, _ in dataset]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _scores_from_bytes(loaded, files: Sequence[str], batch_size: int, signature: str) -> np.ndarray:
    fn = loaded.signatures[signature]
    parts = []
    for chunk in _batches(list(files), batch_size):
        encoded = [Path(f).read_bytes() for f in chunk]
        if signature == "classify":
            parts.append(fn(inputs=tf.constant([_example(e) for e in encoded]))["scores"].numpy())
        else:
            parts.append(fn(image_bytes=tf.constant(encoded))["scores"].numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def evaluate_savedmodel(path: str | os.PathLike, images, *, signature: str = "serving_default",
                        batch_size: int = 32) -> EvalResult:
    """Run every image of ``images`` (a training.data.ImageSet) through the SavedModel at ``path``.

    ``signature`` picks the exported entry point: ``serving_default`` (images decoded
    and resized by training.data, as in training), ``predict_images`` (encoded bytes,
    decoded in the graph) or ``classify`` (tf.Example). The image set's classes are
    matched to the model's by name; a class the model does not know is an error.
    """
    if signature not in SIGNATURES:
        raise ValueError(f"unknown signature {signature!r}; expected one of {', '.join(SIGNATURES)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    path = Path(path)
    if not (path / contract.SAVED_MODEL_FILE).is_file():
        raise ValueError(f"{path} is not a SavedModel directory (no {contract.SAVED_MODEL_FILE})")
    model_classes = contract.read_class_names(path)
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in images.class_names if name not in index]
    if unknown:
        raise ValueError(f"classes not known to the model at {path}: {', '.join(unknown)}"
                         f" (the model knows {', '.join(model_classes)})")
    files = [str(f) for f in images.files]
    if not files:
        raise ValueError("no images to evaluate")
    labels = np.array([index[images.class_names[int(y)]] for y in images.labels], dtype=np.int64)

    loaded = tf.saved_model.load(str(path))
    if signature == "serving_default":
        scores = _scores_from_float_images(loaded, images, batch_size)
    else:
        scores = _scores_from_bytes(loaded, files, batch_size, signature)
    if scores.shape != (len(files), len(model_classes)):
        raise ValueError(f"the model returned scores of shape {scores.shape}, expected "
                         f"({len(files)}, {len(model_classes)})")
    predictions = scores.argmax(axis=-1).astype(np.int64)
    accuracy, per_class, confusion = classification_metrics(labels, predictions, model_classes)
    return EvalResult(accuracy=accuracy, class_names=model_classes, per_class=per_class,
                      confusion=confusion, labels=labels, predictions=predictions,
                      scores=scores, files=files, signature=signature)


def measure_latency(path: str | os.PathLike, images, *, signature: str = "serving_default",
                    runs: int = 100, warmup: int = 5) -> dict[str, float]:
    """Single-image latency of a SavedModel signature, in process: p50, p99, mean (ms).

    ``images`` is a training.data.ImageSet; up to 16 of its images are cycled.
    The first ``warmup`` calls (tracing, allocation) are not counted.
    """
    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures[signature]
    files = list(images.files[:16])
    if signature == "serving_default":
        spec = fn.structured_input_signature[1]["images"]
        subset = dataclasses.replace(images, files=files, labels=list(images.labels[:16]), skipped=[])
        pixels, _ = data.load_arrays(subset, (int(spec.shape[1]), int(spec.shape[2])))
        requests = [{"images": tf.constant(pixels[i:i + 1])} for i in range(len(pixels))]
    elif signature == "predict_images":
        requests = [{"image_bytes": tf.constant([Path(f).read_bytes()])} for f in files]
    else:
        requests = [{"inputs": tf.constant([_example(Path(f).read_bytes())])} for f in files]
    timings = []
    for index in range(warmup + runs):
        started = time.perf_counter()
        outputs = fn(**requests[index % len(requests)])
        # Force the result to the host: the server encodes it, so it is part of the cost.
        for value in outputs.values():
            value.numpy()
        if index >= warmup:
            timings.append((time.perf_counter() - started) * 1000.0)
    return {
        "runs": runs,
        "p50_ms": float(np.percentile(timings, 50)),
        "p99_ms": float(np.percentile(timings, 99)),
        "mean_ms": float(np.mean(timings)),
    }
