"""What the two training loops share: run options, model assembly, phases and results.

:func:`training.fit.train` (Keras ``fit``, one device or MirroredStrategy) and
:func:`training.distributed.train` (a custom ``strategy.run`` loop under
MultiWorkerMirroredStrategy) run the same FreezePlan phases on the same model:

- the head (:func:`build_head`) goes on the backbone's features, standardized
  by a :class:`Standardize` layer (training.warmstart fits it, with the final
  layer, from the linear probe), and the full
  model (preprocess + trunk + head) is assembled from the same layer objects
  (:func:`assemble`), so what was trained is exactly what is exported;
- each phase makes its trunk layers trainable (:func:`set_phase_trainable`),
  gets a fresh optimizer (:func:`make_optimizer`), and trains either the head on
  cached trunk features (:func:`uses_cached_features`) or the full model;
- what a phase did is a :class:`PhaseRun`; a run returns a :class:`TrainResult`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from training import bases, data

HEAD_KINDS = ("gap", "seed")
# A phase's best epoch replaces the phase's start only when a one-sided sign test over
# the validation images the two classify differently says it is better at this level:
# the best of many epochs on a few hundred images wins by an image or two by chance.
KEEP_LEVEL = 0.05


@dataclasses.dataclass
class FitOptions:
    """Run-wide training options (the per-phase ones live in the FreezePlan's phases).

    ``cache_features`` None follows the plan; False forces ``fit`` through the
    frozen trunk (what bench/train.py compares against). ``patience`` is the
    EarlyStopping patience in epochs of the phases that train the trunk;
    ``head_patience`` that of head-only phases, longer because they are cheap
    (cached features) and, on small data, validation accuracy stalls for many
    epochs before it climbs.
    ``verbose`` None means progress bars when stdout is a terminal, one line per
    epoch otherwise. ``lp_init``: the head starts from the ridge probe fitted on
    the training features (LP-FT), and every phase keeps its starting point when
    no epoch beats it on validation; False trains a randomly initialised head.
    """

    image_size: int | tuple[int, int]
    batch_size: int = 32
    seed: int = 0
    augment: bool = True
    augment_copies: int = 0
    cache_features: bool | None = None
    patience: int = 5
    head_patience: int = 20
    log_dir: str | None = None
    checkpoint_dir: str | None = None
    strategy: str = "default"
    verbose: int | None = None
    gap_dropout: float = 0.2
    lp_init: bool = True

    def patience_for(self, phase) -> int:
        """The early stopping patience of ``phase`` (a ``scenarios.Phase``)."""
        return self.patience if phase.train_trunk else self.head_patience


@dataclasses.dataclass
class PhaseRun:
    """What one phase did: its optimizer object, epochs run, best score, and timing.

    ``start_value`` is the monitored score of the weights the phase started
    from (None when it was not measured); ``kept`` says whether the phase ended
    on its best epoch or went back to that start, because no epoch beat it or
    the best one was not significantly better (``versus_start``: the sign test).
    """

    name: str
    train_trunk: bool
    cached_features: bool
    optimizer: keras.optimizers.Optimizer
    epochs_run: int
    best_epoch: int | None
    best_value: float | None
    monitor: str
    seconds: float
    epoch_seconds: list[float]
    trainable_trunk_layers: list[str]
    frozen_trunk_layers: list[str]
    start_value: float | None = None
    kept: str = "best epoch"
    versus_start: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary (the optimizer as its class name and config)."""
        config = self.optimizer.get_config()
        return {
            "name": self.name,
            "train_trunk": self.train_trunk,
            "cached_features": self.cached_features,
            "optimizer": type(self.optimizer).__name__,
            "learning_rate": float(config.get("learning_rate", 0.0)),
            "momentum": float(config["momentum"]) if "momentum" in config else None,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_" + self.monitor: self.best_value,
            "start_" + self.monitor: self.start_value,
            "kept": self.kept,
            "versus_start": self.versus_start,
            "seconds": round(self.seconds, 3),
            "epoch_seconds": [round(s, 4) for s in self.epoch_seconds],
            "trainable_trunk_layers": len(self.trainable_trunk_layers),
            "frozen_trunk_layers": len(self.frozen_trunk_layers),
        }


@dataclasses.dataclass
class TrainResult:
    """The trained full model (raw 0..255 RGB -> probabilities), history per phase, metrics."""

    model: keras.Model
    head: keras.Model
    history: dict[str, dict[str, list[float]]]
    metrics: dict
    phases: list[PhaseRun]


@keras.saving.register_keras_serializable(package="graft")
class Standardize(keras.layers.Layer):
    """``(x - mean) / scale`` per channel (the last axis), from statistics set by :meth:`set_statistics`.

    Non-trainable variables read at every call (Keras' Normalization layer
    copies its statistics into constants, which a later assignment would not
    reach). Standardized features let one learning rate suit every base and
    cut; computes in float32 whatever the global policy.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def build(self, input_shape):
        """Create ``mean`` (zeros) and ``scale`` (ones): the identity until statistics are set."""
        channels = (int(input_shape[-1]),)
        self.mean = self.add_weight(name="mean", shape=channels, initializer="zeros", trainable=False)
        self.scale = self.add_weight(name="scale", shape=channels, initializer="ones", trainable=False)

    def call(self, inputs):
        """Standardize the last axis."""
        return (keras.ops.cast(inputs, self.compute_dtype) - self.mean) / self.scale

    def set_statistics(self, mean, scale) -> None:
        """Set the per-channel mean and scale (scale must be positive)."""
        scale = np.asarray(scale, dtype=np.float32)
        if np.any(scale <= 0):
            raise ValueError("Standardize scale must be positive")
        self.mean.assign(np.asarray(mean, dtype=np.float32))
        self.scale.assign(scale)

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return input_shape


def build_head(kind: str, num_classes: int, feature_shape: Sequence[int], *,
               dropout: float = 0.2, seed: int | None = None) -> keras.Model:
    """The classification head on trunk features of ``feature_shape`` (without batch).

    Both start with :class:`Standardize` (the identity until training.warmstart
    sets it from the training features). ``gap``: GlobalAveragePooling2D,
    Dropout, Dense softmax (a rank-1 feature skips the pooling). ``seed``:
    Flatten, Dense 1024 relu, Dropout 0.5, Dense 1024 relu, Dense softmax, the
    head of the Keras "migration learning" article. The final Dense computes in
    float32 so that mixed precision keeps a stable softmax.
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head {kind!r}; expected one of {', '.join(HEAD_KINDS)}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    inputs = keras.Input(tuple(feature_shape), name="features")
    x = Standardize(name="standardize")(inputs)
    if kind == "gap":
        if len(feature_shape) == 3:
            x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        elif len(feature_shape) != 1:
            raise ValueError(f"the gap head needs [H,W,C] or [C] features, got {tuple(feature_shape)}")
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(1024, activation="relu", name="fc1")(x)
        x = keras.layers.Dropout(0.5, seed=seed, name="dropout")(x)
        x = keras.layers.Dense(1024, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"head_{kind}")


def make_optimizer(name: str, learning_rate: float, momentum: float | None = None) -> keras.optimizers.Optimizer:
    """A new optimizer instance (never shared between phases: its slots belong to one compile)."""
    key = name.lower()
    if key == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum or 0.0)
    if key == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if key == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate, momentum=momentum or 0.0)
    if key == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd, adam, adamw or rmsprop")


def tensorboard_available() -> bool:
    """Whether the tensorboard package (which tf.summary writes through) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def progress_verbosity(verbose: int | None = None) -> int:
    """Keras ``verbose``: progress bars (1) on a terminal, one line per epoch (2) otherwise."""
    if verbose is not None:
        return verbose
    return 1 if sys.stdout.isatty() else 2


def extract_features(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (inference mode) over a dataset of (images, labels); return (features, labels)."""
    # reduce_retracing: the last batch is smaller; one generic trace serves both.
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(tf.cast(forward(images), tf.float32).numpy())
        labels.append(batch_labels.numpy())
    if not features:
        raise ValueError("no images to compute features from")
    return np.concatenate(features), np.concatenate(labels).astype(np.int32)


def score_model(model: keras.Model, dataset: tf.data.Dataset) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` over a dataset of (images, labels)."""
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    correct, loss, count = 0, 0.0, 0
    for images, labels in dataset:
        probs = tf.cast(forward(images), tf.float32).numpy()
        labels = labels.numpy()
        correct += int(np.sum(probs.argmax(axis=-1) == labels))
        picked = probs[np.arange(len(labels)), labels]
        loss += float(-np.log(np.clip(picked, 1e-7, 1.0)).sum())
        count += len(labels)
    if not count:
        raise ValueError("no images to score")
    return {"accuracy": correct / count, "loss": loss / count}


def predicted_labels(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(the class ``model`` predicts, the true label) for each example of a dataset of (inputs, labels), in order."""
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    predicted, labels = [], []
    for inputs, batch_labels in dataset:
        predicted.append(np.argmax(tf.cast(forward(inputs), tf.float32).numpy(), axis=-1))
        labels.append(batch_labels.numpy())
    if not predicted:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(predicted), np.concatenate(labels).astype(np.int64)


def versus_start(best: np.ndarray, start: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """(wins, losses): validation images only the best epoch gets right, and only the start gets right."""
    best_right, start_right = best == labels, start == labels
    return int(np.sum(best_right & ~start_right)), int(np.sum(start_right & ~best_right))


def sign_test(wins: int, losses: int) -> float:
    """One-sided p-value that ``wins`` of ``wins + losses`` disagreements favour one side by chance."""
    total = wins + losses
    if total == 0:
        return 1.0
    return sum(math.comb(total, k) for k in range(wins, total + 1)) / 2 ** total


def keeps_best(wins: int, losses: int) -> dict:
    """The keep-the-better decision between a phase's best epoch and its start, with its evidence."""
    p_value = sign_test(wins, losses)
    return {"wins": wins, "losses": losses, "p_value": p_value, "best": wins > losses and p_value < KEEP_LEVEL}


def check_run(plan, options: FitOptions) -> None:
    """ValueError for a plan and options no loop can run (before any work starts)."""
    if options.augment_copies < 0:
        raise ValueError("augment_copies must be >= 0")
    if not plan.phases:
        raise ValueError("the plan has no phases")
    if options.log_dir and not tensorboard_available():
        # Keras' callback only fails at the first summary, after the features are computed.
        raise ValueError("a TensorBoard log dir needs the tensorboard package: pip install tensorboard")


def assemble(plan, backbone, num_classes: int, options: FitOptions,
             strategy: tf.distribute.Strategy) -> tuple[keras.Model, keras.Model]:
    """(head, full model): ``plan``'s head on ``backbone``'s features, both built in ``strategy``'s scope.

    The full model maps raw 0..255 RGB images of ``options.image_size`` to probabilities.
    """
    with strategy.scope():
        feature_shape = tuple(backbone.model.output.shape[1:])
        head = build_head(plan.head, num_classes, feature_shape, dropout=options.gap_dropout, seed=options.seed)
        inputs = keras.Input((*data.image_hw(options.image_size), 3), name="images")
        full = keras.Model(inputs, head(backbone.model(inputs)), name=f"graft_{backbone.spec.name}")
    return head, full


def uses_cached_features(plan, options: FitOptions, phase) -> bool:
    """Whether ``phase`` trains the head alone on cached trunk features (only while the trunk is frozen)."""
    allowed = plan.cache_features if options.cache_features is None else options.cache_features
    return bool(allowed and not phase.train_trunk)


def set_phase_trainable(plan, backbone, phase) -> list[str]:
    """Make the trunk layers ``phase`` trains trainable (BatchNormalization stays frozen); return their names."""
    names = [layer.name for layer in backbone.trunk.layers]
    return bases.set_trunk_trainable(backbone.trunk, plan.trainable_trunk_layers(names, phase))


def frozen_trunk_layers(backbone, trainable: Sequence[str]) -> list[str]:
    """The trunk layers with weights that are not in ``trainable``."""
    return [layer.name for layer in backbone.trunk.layers if layer.weights and layer.name not in trainable]


def phase_title(index: int, plan, phase, cached: bool, trainable: Sequence[str]) -> str:
    """``phase 1/2 head: head on cached features``: the line printed as a phase starts."""
    what = "head on cached features" if cached else (
        f"{len(trainable)} trunk layers + head" if phase.train_trunk else "head, trunk frozen")
    return f"phase {index + 1}/{len(plan.phases)} {phase.name}: {what}"
