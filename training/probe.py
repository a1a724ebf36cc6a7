"""Linear probes at block ends: how well does each depth of a trunk separate the new classes?

Features at every block end come from one forward pass, global-average
pooled; a ridge-regression classifier on one-hot targets (closed form, its
regularisation picked by exact leave-one-out on the training set) is scored
on the validation features. Cheap enough for VGG16 at 64 px on the demo data:
the cost is one forward pass over the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from training.bases import Backbone, preprocess_layer

# Ridge strengths tried, relative to the mean squared singular value.
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# The smallest channel scale, relative to the mean channel's standard deviation. A channel
# that is nearly dead on the training images would otherwise be divided by almost nothing:
# it dominates held-out images where it fires, and a head started from the probe passes
# that amplification into the trunk's gradients when fine-tuning (docs/benchmarks.md).
SCALE_FLOOR = 0.1
# Softmax temperatures tried for the probe's scores (a log grid): ridge scores sit
# near the {-1, 1} targets, far too flat for a softmax that a head then trains from.
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.1, 100.0, 61))


def block_features_model(source: Backbone | keras.Model, block_ends: Sequence[str]) -> keras.Model:
    """A model from raw 0..255 images to the globally pooled outputs at `block_ends`.

    A Backbone gets its base's preprocessing in front of its trunk; a plain
    keras.Model is used as given (its inputs must be what it expects).
    """
    trunk = source.trunk if isinstance(source, Backbone) else source
    names = {layer.name for layer in trunk.layers}
    missing = [name for name in block_ends if name not in names]
    if missing:
        raise ValueError(f"block ends not in {trunk.name}: {', '.join(missing)}")
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"probe_{name}")(trunk.get_layer(name).output)
              for name in block_ends]
    features = keras.Model(trunk.input, pooled, name="probe_features")
    if not isinstance(source, Backbone):
        return features
    inputs = keras.Input(tuple(trunk.input.shape[1:]), name="images")
    return keras.Model(inputs, features(preprocess_layer(source.spec)(inputs)), name="probe_backbone")


@dataclass(frozen=True)
class RidgeProbe:
    """A fitted linear probe: standardization, ridge weights on {-1, 1} one-hot targets, the chosen strength.

    ``temperature`` scales the scores into softmax logits (:meth:`logits`); it
    changes no prediction. ``loo_accuracy`` is the exact leave-one-out accuracy
    on the training features at the chosen strength.
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    offset: np.ndarray
    alpha: float
    temperature: float = 1.0
    loo_accuracy: float | None = None

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Per-class scores [N, C]."""
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.weights + self.offset

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Softmax logits [N, C]: the scores times the temperature."""
        return self.decision_function(features) * self.temperature

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted class indices [N]."""
        return np.argmax(self.decision_function(features), axis=1)


def fit_ridge(features: np.ndarray, labels, n_classes: int, *, alphas: Sequence[float] = ALPHAS) -> RidgeProbe:
    """Fit a ridge classifier (with intercept) on standardized features.

    Each feature is centred and divided by ``sqrt(std ** 2 + (SCALE_FLOOR *
    mean std) ** 2)``: its standard deviation, floored for near-dead channels.
    Each alpha is scaled by the mean squared singular value of the features;
    the one with the best exact leave-one-out accuracy on `features` wins
    (from one SVD, as scikit-learn's RidgeClassifierCV computes it). The
    temperature minimises the cross-entropy of the leave-one-out scores, so
    that it is not fitted to scores the training images were seen for.
    """
    labels = np.asarray(labels, dtype=np.int64)
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    scale = np.sqrt(std ** 2 + (SCALE_FLOOR * std.mean()) ** 2)
    scale[scale < 1e-8] = 1.0  # every channel dead (ReLU never on): nothing to scale
    x = (x - mean) / scale
    targets = np.eye(n_classes)[labels] * 2.0 - 1.0
    offset = targets.mean(axis=0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ (targets - offset)
    unit = float(np.mean(s ** 2)) if len(s) and np.any(s) else 1.0
    best_alpha, best_score, best_loo = alphas[0], -1.0, None
    for alpha in alphas:
        shrink = s ** 2 / (s ** 2 + alpha * unit)
        fitted = u @ (shrink[:, None] * uty) + offset
        # Centring stands for the intercept column, whose leverage is 1/n.
        leverage = np.einsum("ij,j,ij->i", u, shrink, u) + 1.0 / len(x)
        loo = (fitted - leverage[:, None] * targets) / np.maximum(1.0 - leverage, 1e-12)[:, None]
        score = float(np.mean(np.argmax(loo, axis=1) == labels))
        if score > best_score:
            best_alpha, best_score, best_loo = alpha, score, loo
    weights = vt.T @ ((s / (s ** 2 + best_alpha * unit))[:, None] * uty)
    return RidgeProbe(mean, scale, weights, offset, float(best_alpha * unit), _temperature(best_loo, labels),
                      best_score)


def _temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The grid temperature with the least mean cross-entropy of softmax(scores * t)."""
    picked = np.arange(len(labels))
    best, best_loss = 1.0, np.inf
    for t in TEMPERATURES:
        z = scores * t
        z = z - z.max(axis=1, keepdims=True)
        loss = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[picked, labels]))
        if loss < best_loss:
            best, best_loss = t, loss
    return best


def ridge_probe(train: np.ndarray, train_labels, val: np.ndarray, val_labels, n_classes: int) -> float:
    """Validation accuracy of a ridge probe fitted on `train`."""
    probe = fit_ridge(train, train_labels, n_classes)
    return float(np.mean(probe.predict(val) == np.asarray(val_labels)))


@dataclass(frozen=True)
class BlockScore:
    """How well a probe at one block end classifies: on validation, and leave-one-out on training."""

    val_accuracy: float
    train_loo_accuracy: float
    val_count: int
    train_count: int

    @property
    def accuracy(self) -> float:
        """Validation and leave-one-out training predictions pooled: every image counted once.

        A few hundred validation images cannot rank blocks a point or two
        apart; the leave-one-out predictions on the training images are as
        honest (no image scores a probe fitted on it) and double the count.
        """
        correct = self.val_accuracy * self.val_count + self.train_loo_accuracy * self.train_count
        return correct / (self.val_count + self.train_count)

    def describe(self) -> dict:
        """JSON-ready: the pooled accuracy and its parts."""
        return {"accuracy": self.accuracy, "val_accuracy": self.val_accuracy,
                "train_loo_accuracy": self.train_loo_accuracy, "val_images": self.val_count,
                "train_images": self.train_count}


def probe_blocks(source: Backbone | keras.Model, images: np.ndarray, labels, val_images: np.ndarray,
                 val_labels, block_ends: Sequence[str], *, seed: int = 0,
                 batch_size: int = 32) -> dict[str, float]:
    """Validation accuracy of a linear probe at each block end, features computed once.

    `source` is a Backbone (images are raw 0..255 RGB) or a trunk taking
    already preprocessed images. `seed` is accepted for the interface; the
    probe is deterministic (closed form).
    """
    scores = score_blocks(source, images, labels, val_images, val_labels, block_ends, seed=seed,
                          batch_size=batch_size)
    return {name: score.val_accuracy for name, score in scores.items()}


def score_blocks(source: Backbone | keras.Model, images: np.ndarray, labels, val_images: np.ndarray,
                 val_labels, block_ends: Sequence[str], *, seed: int = 0,
                 batch_size: int = 32) -> dict[str, BlockScore]:
    """A :class:`BlockScore` per block end, as :func:`probe_blocks` computes them."""
    del seed  # closed-form: nothing random
    labels = np.asarray(labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    if len(images) != len(labels) or len(val_images) != len(val_labels):
        raise ValueError("images and labels differ in length")
    if not len(images) or not len(val_images):
        raise ValueError("probing needs training and validation images")
    n_classes = int(max(labels.max(), val_labels.max())) + 1
    model = block_features_model(source, block_ends)
    train_features = _predict(model, images, batch_size)
    val_features = _predict(model, val_images, batch_size)
    scores = {}
    for name, train, val in zip(block_ends, train_features, val_features):
        fitted = fit_ridge(train, labels, n_classes)
        scores[name] = BlockScore(float(np.mean(fitted.predict(val) == val_labels)), float(fitted.loo_accuracy),
                                  len(val_labels), len(labels))
    return scores


def _predict(model: keras.Model, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    outputs = model.predict(np.asarray(images, dtype=np.float32), batch_size=batch_size, verbose=0)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
