"""LP-FT's first half: a head that starts as the linear probe fitted on its own features.

Kumar et al. (ICLR 2022): fitting the linear head first and fine-tuning from
it beats fine-tuning from a random head. Here the ridge probe
(training.probe) is fitted on the globally pooled training features the head
sees, and written into the head so that, before any training, the head
predicts exactly what the probe predicts:

- ``gap`` head: the probe's standardization goes into the head's
  :class:`~training.phases.Standardize` layer, its weights (times the
  temperature) into the final Dense;
- ``seed`` head (Flatten, Dense 1024, Dense 1024, Dense): standardization the
  same way; the probe's logits ``z`` pass through the two ReLU layers as
  ``relu(z)`` and ``relu(-z)`` in ``2 * classes`` units of each, and the final
  layer takes ``relu(z) - relu(-z) = z``. The other hidden units keep their
  random initialisation and enter the output with weight zero, so they start
  silent and learn from there. Global average pooling is linear, so the
  pass-through sits in the first Dense's weights (divided by the positions).

The keep-the-better rule (a phase that does not beat its start on validation
ends where it started) is the training loop's (training.fit).
"""

from __future__ import annotations

import keras
import numpy as np

from training import probe


def pooled(features: np.ndarray) -> np.ndarray:
    """[N, ..., C] features averaged over every axis between the first and the last: [N, C]."""
    features = np.asarray(features)
    if features.ndim < 2:
        raise ValueError(f"features need a batch and a channel axis, got shape {features.shape}")
    return features.reshape(len(features), -1, features.shape[-1]).mean(axis=1)


def init_head(head: keras.Model, kind: str, features: np.ndarray, labels, num_classes: int) -> probe.RidgeProbe | None:
    """Fit the ridge probe on ``features`` (the head's inputs) and start ``head`` from it.

    Returns the probe, or None for a ``seed`` head whose hidden layers are too
    narrow to pass the probe's logits through (fewer than ``2 * num_classes``
    units); that head keeps its random initialisation.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(features):
        raise ValueError("features and labels differ in length")
    fitted = probe.fit_ridge(pooled(features), labels, num_classes)
    weights = fitted.weights * fitted.temperature
    bias = fitted.offset * fitted.temperature
    final = head.get_layer("predictions")
    if kind == "gap":
        head.get_layer("standardize").set_statistics(fitted.mean, fitted.scale)
        final.kernel.assign(weights.astype(np.float32))
        final.bias.assign(bias.astype(np.float32))
        return fitted
    if kind != "seed":
        raise ValueError(f"unknown head {kind!r}")
    fc1, fc2 = head.get_layer("fc1"), head.get_layer("fc2")
    if min(fc1.units, fc2.units) < 2 * num_classes:
        return None
    head.get_layer("standardize").set_statistics(fitted.mean, fitted.scale)
    _pass_through(fc1, fc2, final, weights, bias, num_classes)
    return fitted


def _pass_through(fc1, fc2, final, weights: np.ndarray, bias: np.ndarray, num_classes: int) -> None:
    """Write the probe's logits through two ReLU layers into the final layer (see the module docstring)."""
    channels = weights.shape[0]
    kernel1 = keras.ops.convert_to_numpy(fc1.kernel).copy()
    positions = kernel1.shape[0] // channels
    if positions * channels != kernel1.shape[0]:
        raise ValueError(f"fc1 takes {kernel1.shape[0]} inputs, not a multiple of {channels} channels")
    # Flatten lays [H, W, C] out as position-major rows: row p * C + c is channel c at position p.
    per_position = np.tile(weights / positions, (positions, 1))
    k = num_classes
    kernel1[:, :k], kernel1[:, k:2 * k] = per_position, -per_position
    bias1 = keras.ops.convert_to_numpy(fc1.bias).copy()
    bias1[:k], bias1[k:2 * k] = bias, -bias
    fc1.kernel.assign(kernel1.astype(np.float32))
    fc1.bias.assign(bias1.astype(np.float32))

    kernel2 = keras.ops.convert_to_numpy(fc2.kernel).copy()
    eye = np.eye(k)
    kernel2[:, :2 * k] = 0.0
    kernel2[:2 * k, :2 * k] = np.block([[eye, -eye], [-eye, eye]])
    bias2 = keras.ops.convert_to_numpy(fc2.bias).copy()
    bias2[:2 * k] = 0.0
    fc2.kernel.assign(kernel2.astype(np.float32))
    fc2.bias.assign(bias2.astype(np.float32))

    kernel3 = np.zeros(tuple(final.kernel.shape), np.float32)
    kernel3[:2 * k] = np.concatenate([eye, -eye])
    final.kernel.assign(kernel3)
    final.bias.assign(np.zeros(k, np.float32))
