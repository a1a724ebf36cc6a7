"""The phase loop: train a head (and optionally the trunk) according to a FreezePlan.

Each phase gets a fresh optimizer and a recompile (Keras needs one after any
change of ``trainable``). While the trunk is frozen (scenarios 1 and 3 and the
head phase of every scenario) the trunk's features are computed once, plus
``augment_copies`` augmented passes, and the head trains alone on them: an
epoch then costs a few matrix products instead of a full forward pass through
the CNN. The full model (preprocess + trunk + head) is assembled from the same
layer objects, so what was trained is exactly what is exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

HEAD_KINDS = ("gap", "seed")
STRATEGIES = ("default", "mirrored", "multiworker")


@dataclasses.dataclass
class FitOptions:
    """Run-wide training options (the per-phase ones live in the FreezePlan's phases).

    ``cache_features`` None follows the plan; False forces ``fit`` through the
    frozen trunk (what bench/train.py compares against). ``patience`` is the
    EarlyStopping patience in epochs of the phases that train the trunk;
    ``head_patience`` that of head-only phases, longer because they are cheap
    (cached features) and, on small data, validation accuracy stalls for many
    epochs before it climbs (demo digits, 10 images per class, VGG16 block4
    features: 10 head epochs at patience 5 gave 36% held-out, 100 at patience 5
    55%, 100 at patience 20 89%).
    ``verbose`` None means progress bars when stdout is a terminal, one line per
    epoch otherwise.
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

    def patience_for(self, phase) -> int:
        """The early stopping patience of ``phase`` (a ``scenarios.Phase``)."""
        return self.patience if phase.train_trunk else self.head_patience


@dataclasses.dataclass
class PhaseRun:
    """What one phase did: its optimizer object, epochs run, best score, and timing."""

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


def build_head(kind: str, num_classes: int, feature_shape: Sequence[int], *,
               dropout: float = 0.2, seed: int | None = None) -> keras.Model:
    """The classification head on trunk features of ``feature_shape`` (without batch).

    ``gap``: GlobalAveragePooling2D, Dropout, Dense softmax (a rank-1 feature skips
    the pooling). ``seed``: Flatten, Dense 1024 relu, Dropout 0.5, Dense 1024 relu,
    Dense softmax, the head of the Keras "migration learning" article. The final
    Dense computes in float32 so that mixed precision keeps a stable softmax.
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head {kind!r}; expected one of {', '.join(HEAD_KINDS)}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    inputs = keras.Input(tuple(feature_shape), name="features")
    x = inputs
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


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` (the current device), ``mirrored`` (all local GPUs) or ``multiworker`` (TF_CONFIG's cluster)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        # Reads TF_CONFIG; must come before any other TensorFlow work in the process.
        from training import distributed

        return distributed.make_strategy()
    raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")


@contextlib.contextmanager
def strategy_scope(name: str) -> Iterator[tf.distribute.Strategy]:
    """Enter the named strategy's scope; build the backbone *and* call :func:`train` inside it.

    Variables must be created under the strategy that trains them, so the scope
    has to cover the backbone that the caller builds, not only the head.
    """
    strategy = make_strategy(name)
    with strategy.scope():
        yield strategy


@contextlib.contextmanager
def precision_policy(mixed: bool) -> Iterator[str]:
    """Set Keras' global dtype policy for the block (``mixed_float16`` if ``mixed``), then restore it.

    It must be entered before any layer is built: a layer takes the policy at construction.
    """
    previous = keras.config.dtype_policy()
    name = "mixed_float16" if mixed else previous.name
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(previous)


def tensorboard_available() -> bool:
    """Whether the tensorboard package (which tf.summary writes through) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def progress_verbosity(verbose: int | None = None) -> int:
    """Keras ``verbose``: progress bars (1) on a terminal, one line per epoch (2) otherwise."""
    if verbose is not None:
        return verbose
    return 1 if sys.stdout.isatty() else 2


class _EpochTimer(keras.callbacks.Callback):
    """Records wall time per epoch (the bench and report compare them)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


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


class _Trainer:
    """Holds the datasets, caches and callbacks shared by the phases of one run."""

    def __init__(self, plan, backbone, train_images, val_images, options: FitOptions):
        from training import data

        self.data = data
        self.plan = plan
        self.backbone = backbone
        self.train_images = train_images
        self.val_images = val_images if val_images is not None and len(val_images.files) else None
        self.options = options
        self.size = data.image_hw(options.image_size)
        self.verbose = progress_verbosity(options.verbose)
        self.monitor = "val_accuracy" if self.val_images is not None else "accuracy"
        self._feature_cache: tuple | None = None
        self._image_cache: tuple | None = None

    # -- datasets -------------------------------------------------------
    def _dataset(self, images, *, training, augment, seed=None):
        return self.data.make_dataset(
            images, self.size, self.options.batch_size, training=training,
            seed=self.options.seed if seed is None else seed, augment=augment)

    def image_datasets(self):
        """(train, val) datasets of raw images: augmented train split, plain validation."""
        if self._image_cache is None:
            train = self._dataset(self.train_images, training=True, augment=self.options.augment)
            val = (self._dataset(self.val_images, training=False, augment=False)
                   if self.val_images is not None else None)
            self._image_cache = (train, val)
        return self._image_cache

    def feature_datasets(self):
        """(train, val) datasets of cached trunk features, computed once per run."""
        if self._feature_cache is None:
            model = self.backbone.model
            parts = [extract_features(model, self._dataset(self.train_images, training=False, augment=False))]
            for copy in range(self.options.augment_copies):
                # A different seed per copy, else every copy would be the same augmentation.
                augmented = self._dataset(self.train_images, training=True, augment=True,
                                          seed=self.options.seed + 1000 * (copy + 1))
                parts.append(extract_features(model, augmented))
            features = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            train = (tf.data.Dataset.from_tensor_slices((features, labels))
                     .shuffle(len(labels), seed=self.options.seed, reshuffle_each_iteration=True)
                     .batch(self.options.batch_size)
                     .prefetch(tf.data.AUTOTUNE))
            val = None
            if self.val_images is not None:
                val_features, val_labels = extract_features(
                    model, self._dataset(self.val_images, training=False, augment=False))
                val = (tf.data.Dataset.from_tensor_slices((val_features, val_labels))
                       .batch(self.options.batch_size).prefetch(tf.data.AUTOTUNE))
            self._feature_cache = (train, val, len(labels))
        return self._feature_cache

    # -- callbacks ------------------------------------------------------
    def callbacks(self, phase, checkpoint: Path) -> tuple[list, _EpochTimer]:
        timer = _EpochTimer()
        callbacks = [
            timer,
            keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor=self.monitor, mode="max",
                save_best_only=True, save_weights_only=True, verbose=0),
            keras.callbacks.EarlyStopping(monitor=self.monitor, mode="max",
                                          patience=self.options.patience_for(phase), verbose=0),
        ]
        if self.options.log_dir:
            callbacks.append(keras.callbacks.TensorBoard(
                log_dir=str(Path(self.options.log_dir) / phase.name)))
        return callbacks, timer


def _set_trainable(plan, backbone, phase) -> list[str]:
    from training import bases

    names = [layer.name for layer in backbone.trunk.layers]
    return bases.set_trunk_trainable(backbone.trunk, plan.trainable_trunk_layers(names, phase))


def train(plan, backbone, train_images, val_images, options: FitOptions) -> TrainResult:
    """Run every phase of ``plan`` on ``backbone`` and return the trained full model.

    ``train_images`` / ``val_images`` are training.data.ImageSet (``val_images`` may
    be None). With ``options.strategy == "mirrored"`` the caller must already be
    inside :func:`strategy_scope` (the backbone's variables have to be created in it).
    The best epoch of each phase (by val_accuracy, else accuracy) is restored
    before the next phase starts.
    """
    if options.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {options.strategy!r}")
    if options.strategy == "mirrored" and not tf.distribute.has_strategy():
        raise ValueError("strategy 'mirrored': build the backbone and call train() inside fit.strategy_scope()")
    if options.strategy == "multiworker":
        # Keras 3 fit() fails under MultiWorkerMirroredStrategy (tensorflow#72388): a custom loop.
        from training import distributed

        return distributed.train(plan, backbone, train_images, val_images, options)
    if options.augment_copies < 0:
        raise ValueError("augment_copies must be >= 0")
    if not plan.phases:
        raise ValueError("the plan has no phases")
    if options.log_dir and not tensorboard_available():
        # Keras' callback only fails at the first summary, after the features are computed.
        raise ValueError("a TensorBoard log dir needs the tensorboard package: pip install tensorboard")
    keras.utils.set_random_seed(options.seed)
    trainer = _Trainer(plan, backbone, train_images, val_images, options)
    num_classes = len(train_images.class_names)
    strategy = tf.distribute.get_strategy()

    with strategy.scope():
        feature_shape = tuple(backbone.model.output.shape[1:])
        head = build_head(plan.head, num_classes, feature_shape, dropout=options.gap_dropout, seed=options.seed)
        inputs = keras.Input((*trainer.size, 3), name="images")
        full = keras.Model(inputs, head(backbone.model(inputs)), name=f"graft_{backbone.spec.name}")

    cache_allowed = plan.cache_features if options.cache_features is None else options.cache_features
    history: dict[str, dict[str, list[float]]] = {}
    runs: list[PhaseRun] = []
    with contextlib.ExitStack() as stack:
        checkpoint_dir = (Path(options.checkpoint_dir) if options.checkpoint_dir
                          else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-ckpt-"))))
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for index, phase in enumerate(plan.phases):
            trainable = _set_trainable(plan, backbone, phase)
            cached = bool(cache_allowed and not phase.train_trunk)
            target = head if cached else full
            with strategy.scope():
                optimizer = make_optimizer(phase.optimizer, phase.learning_rate, phase.momentum)
                target.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                               metrics=["accuracy"])
            if cached:
                train_ds, val_ds, _ = trainer.feature_datasets()
            else:
                train_ds, val_ds = trainer.image_datasets()
            checkpoint = checkpoint_dir / f"{index:02d}-{phase.name}.weights.h5"
            callbacks, timer = trainer.callbacks(phase, checkpoint)
            if trainer.verbose:
                what = "head on cached features" if cached else (
                    f"{len(trainable)} trunk layers + head" if phase.train_trunk else "head, trunk frozen")
                print(f"phase {index + 1}/{len(plan.phases)} {phase.name}: {what}", flush=True)
            started = time.perf_counter()
            # shuffle=False: the datasets shuffle themselves (Keras ignores it for tf.data and warns).
            fitted = target.fit(train_ds, validation_data=val_ds, epochs=phase.epochs,
                                callbacks=callbacks, verbose=trainer.verbose, shuffle=False)
            seconds = time.perf_counter() - started
            values = fitted.history.get(trainer.monitor, [])
            best_epoch = int(np.argmax(values)) if values else None
            if checkpoint.exists():
                target.load_weights(str(checkpoint))
            history[phase.name] = {k: [float(v) for v in vs] for k, vs in fitted.history.items()}
            runs.append(PhaseRun(
                name=phase.name, train_trunk=phase.train_trunk, cached_features=cached,
                optimizer=optimizer, epochs_run=len(timer.seconds), best_epoch=best_epoch,
                best_value=float(values[best_epoch]) if values else None, monitor=trainer.monitor,
                seconds=seconds, epoch_seconds=timer.seconds, trainable_trunk_layers=trainable,
                frozen_trunk_layers=[layer.name for layer in backbone.trunk.layers
                                     if layer.weights and layer.name not in trainable]))

    metrics = {
        "train_images": len(train_images.files),
        "val_images": len(trainer.val_images.files) if trainer.val_images is not None else 0,
        "cached_train_features": trainer._feature_cache[2] if trainer._feature_cache else 0,
        "phases": [run.to_dict() for run in runs],
    }
    _, val_ds = trainer.image_datasets()
    if val_ds is not None:
        # Scored on the assembled model, the object that is exported; no recompile, so
        # model.optimizer stays the last phase's.
        scores = score_model(full, val_ds)
        metrics.update({"val_accuracy": scores["accuracy"], "val_loss": scores["loss"]})
    return TrainResult(model=full, head=head, history=history, metrics=metrics, phases=runs)
