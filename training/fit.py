"""Training under any strategy: the strategy is chosen here, and Keras' ``fit`` runs the phases.

:func:`make_strategy` / :func:`strategy_scope` turn a strategy name into the
tf.distribute strategy the backbone is built under, and :func:`train` runs a
FreezePlan under it: with Keras' ``fit`` on one device or under
MirroredStrategy, and with training.distributed's own loop under
MultiWorkerMirroredStrategy (where Keras 3's ``fit`` fails).

Each phase gets a fresh optimizer and a recompile (Keras needs one after any
change of ``trainable``). While the trunk is frozen (scenarios 1 and 3 and the
head phase of every scenario) the trunk's features are computed once, plus
``augment_copies`` augmented passes, and the head trains alone on them: an
epoch then costs a few matrix products instead of a full forward pass through
the CNN. Model assembly and the phase rules are training.phases', shared with
the multi-worker loop.

LP-FT (``FitOptions.lp_init``, the default): before the first phase the head
starts as the ridge probe on the training features (training.warmstart), and
every phase measures its starting point on validation first: a phase whose
best epoch does not beat that start, or beats it by no more than chance (a
sign test over the validation images the two classify differently,
phases.keeps_best), ends where it started. The exported model therefore never
scores below the probe on validation.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from training import data, distributed, phases, warmstart
from training.phases import FitOptions, PhaseRun, TrainResult

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` (the current device), ``mirrored`` (all local GPUs) or ``multiworker`` (TF_CONFIG's cluster)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        # Reads TF_CONFIG; must come before any other TensorFlow work in the process.
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


class _Trainer:
    """Holds the datasets, caches and callbacks shared by the phases of one run."""

    def __init__(self, plan, backbone, train_images, val_images, options: FitOptions):
        self.plan = plan
        self.backbone = backbone
        self.train_images = train_images
        self.val_images = val_images if val_images is not None and len(val_images.files) else None
        self.options = options
        self.size = data.image_hw(options.image_size)
        self.verbose = phases.progress_verbosity(options.verbose)
        self.monitor = "val_accuracy" if self.val_images is not None else "accuracy"
        self._feature_cache: tuple | None = None
        self._image_cache: tuple | None = None
        self._plain_features: tuple | None = None

    # -- datasets -------------------------------------------------------
    def _dataset(self, images, *, training, augment, seed=None):
        return data.make_dataset(
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

    def plain_features(self):
        """(train features, labels, validation features and labels or None): no augmentation, computed once."""
        if self._plain_features is None:
            model = self.backbone.model
            train = phases.extract_features(model, self._dataset(self.train_images, training=False, augment=False))
            val = None
            if self.val_images is not None:
                val = phases.extract_features(model, self._dataset(self.val_images, training=False, augment=False))
            self._plain_features = (*train, val)
        return self._plain_features

    def feature_datasets(self):
        """(train, val) datasets of cached trunk features, computed once per run."""
        if self._feature_cache is None:
            model = self.backbone.model
            train_features, train_labels, val_pair = self.plain_features()
            parts = [(train_features, train_labels)]
            for copy in range(self.options.augment_copies):
                # A different seed per copy, else every copy would be the same augmentation.
                augmented = self._dataset(self.train_images, training=True, augment=True,
                                          seed=self.options.seed + 1000 * (copy + 1))
                parts.append(phases.extract_features(model, augmented))
            features = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            train = (tf.data.Dataset.from_tensor_slices((features, labels))
                     .shuffle(len(labels), seed=self.options.seed, reshuffle_each_iteration=True)
                     .batch(self.options.batch_size)
                     .prefetch(tf.data.AUTOTUNE))
            val = None
            if val_pair is not None:
                val = (tf.data.Dataset.from_tensor_slices(val_pair)
                       .batch(self.options.batch_size).prefetch(tf.data.AUTOTUNE))
            self._feature_cache = (train, val, len(labels))
        return self._feature_cache

    # -- callbacks ------------------------------------------------------
    def callbacks(self, phase, checkpoint: Path, start_value: float | None) -> tuple[list, _EpochTimer]:
        """The phase's callbacks; with ``start_value`` only an epoch that beats it is checkpointed."""
        timer = _EpochTimer()
        callbacks = [
            timer,
            keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor=self.monitor, mode="max", save_best_only=True,
                save_weights_only=True, initial_value_threshold=start_value, verbose=0),
            keras.callbacks.EarlyStopping(monitor=self.monitor, mode="max",
                                          patience=self.options.patience_for(phase), verbose=0),
        ]
        if self.options.log_dir:
            callbacks.append(keras.callbacks.TensorBoard(
                log_dir=str(Path(self.options.log_dir) / phase.name)))
        return callbacks, timer


def train(plan, backbone, train_images, val_images, options: FitOptions) -> TrainResult:
    """Run every phase of ``plan`` on ``backbone`` and return the trained full model.

    ``train_images`` / ``val_images`` are training.data.ImageSet (``val_images`` may
    be None). With ``options.strategy`` "mirrored" or "multiworker" the caller must
    already be inside :func:`strategy_scope` (the backbone's variables have to be
    created in it); "multiworker" runs training.distributed's loop. The best epoch
    of each phase (by val_accuracy, else accuracy) is restored before the next
    phase starts; with ``options.lp_init`` the head starts as the ridge probe and
    a phase whose best epoch does not beat its start on validation ends at its
    start (``PhaseRun.kept``).
    """
    if options.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {options.strategy!r}")
    if options.strategy == "mirrored" and not tf.distribute.has_strategy():
        raise ValueError("strategy 'mirrored': build the backbone and call train() inside fit.strategy_scope()")
    if options.strategy == "multiworker":
        # Keras 3 fit() fails under MultiWorkerMirroredStrategy (tensorflow#72388): a custom loop.
        return distributed.train(plan, backbone, train_images, val_images, options)
    phases.check_run(plan, options)
    keras.utils.set_random_seed(options.seed)
    trainer = _Trainer(plan, backbone, train_images, val_images, options)
    strategy = tf.distribute.get_strategy()
    head, full = phases.assemble(plan, backbone, len(train_images.class_names), options, strategy)
    probe_info = (_start_from_probe(plan, trainer, head, len(train_images.class_names))
                  if options.lp_init else None)

    history: dict[str, dict[str, list[float]]] = {}
    runs: list[PhaseRun] = []
    with contextlib.ExitStack() as stack:
        checkpoint_dir = (Path(options.checkpoint_dir) if options.checkpoint_dir
                          else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-ckpt-"))))
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for index, phase in enumerate(plan.phases):
            trainable = phases.set_phase_trainable(plan, backbone, phase)
            cached = phases.uses_cached_features(plan, options, phase)
            target = head if cached else full
            with strategy.scope():
                optimizer = phases.make_optimizer(phase.optimizer, phase.learning_rate, phase.momentum)
                target.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                               metrics=["accuracy"])
            if cached:
                train_ds, val_ds, _ = trainer.feature_datasets()
            else:
                train_ds, val_ds = trainer.image_datasets()
            start_value, start_weights, start_predictions, val_labels = None, None, None, None
            if options.lp_init and val_ds is not None:
                start_predictions, val_labels = phases.predicted_labels(target, val_ds)
                # Rounded as Keras logs the metric, so that a tie does not count as beating the start.
                start_value = float(np.float32(np.mean(start_predictions == val_labels)))
                start_weights = target.get_weights()
            checkpoint = checkpoint_dir / f"{index:02d}-{phase.name}.weights.h5"
            checkpoint.unlink(missing_ok=True)  # a reused --checkpoint-dir must not leak an old best
            callbacks, timer = trainer.callbacks(phase, checkpoint, start_value)
            if trainer.verbose:
                print(phases.phase_title(index, plan, phase, cached, trainable), flush=True)
            started = time.perf_counter()
            # shuffle=False: the datasets shuffle themselves (Keras ignores it for tf.data and warns).
            fitted = target.fit(train_ds, validation_data=val_ds, epochs=phase.epochs,
                                callbacks=callbacks, verbose=trainer.verbose, shuffle=False)
            seconds = time.perf_counter() - started
            values = fitted.history.get(trainer.monitor, [])
            best_epoch = int(np.argmax(values)) if values else None
            kept, versus = "best epoch", None
            if checkpoint.exists():
                target.load_weights(str(checkpoint))
                if start_weights is not None:
                    best_predictions, _ = phases.predicted_labels(target, val_ds)
                    versus = phases.keeps_best(*phases.versus_start(best_predictions, start_predictions, val_labels))
                    if not versus["best"]:
                        target.set_weights(start_weights)
                        kept = "start"
            elif start_weights is not None:
                target.set_weights(start_weights)
                kept = "start"
            if trainer.verbose and start_value is not None:
                print(_kept_line(phase.name, trainer.monitor, kept, start_value,
                                 values[best_epoch] if values else None, versus), flush=True)
            history[phase.name] = {k: [float(v) for v in vs] for k, vs in fitted.history.items()}
            runs.append(PhaseRun(
                name=phase.name, train_trunk=phase.train_trunk, cached_features=cached,
                optimizer=optimizer, epochs_run=len(timer.seconds), best_epoch=best_epoch,
                best_value=float(values[best_epoch]) if values else None, monitor=trainer.monitor,
                seconds=seconds, epoch_seconds=timer.seconds, trainable_trunk_layers=trainable,
                frozen_trunk_layers=phases.frozen_trunk_layers(backbone, trainable),
                start_value=start_value, kept=kept, versus_start=versus))

    metrics = {
        "train_images": len(train_images.files),
        "val_images": len(trainer.val_images.files) if trainer.val_images is not None else 0,
        "cached_train_features": trainer._feature_cache[2] if trainer._feature_cache else 0,
        "lp_init": probe_info is not None,
        "phases": [run.to_dict() for run in runs],
    }
    if probe_info is not None:
        metrics["probe"] = probe_info
    _, val_ds = trainer.image_datasets()
    if val_ds is not None:
        # Scored on the assembled model, the object that is exported; no recompile, so
        # model.optimizer stays the last phase's.
        scores = phases.score_model(full, val_ds)
        metrics.update({"val_accuracy": scores["accuracy"], "val_loss": scores["loss"]})
    return TrainResult(model=full, head=head, history=history, metrics=metrics, phases=runs)


def _start_from_probe(plan, trainer: _Trainer, head: keras.Model, num_classes: int) -> dict | None:
    """Start ``head`` as the ridge probe on the plain training features; what the probe is, or None.

    None when the head cannot hold the probe (training.warmstart.init_head).
    """
    train_features, train_labels, val = trainer.plain_features()
    fitted = warmstart.init_head(head, plan.head, train_features, train_labels, num_classes)
    if fitted is None:
        if trainer.verbose:
            print(f"LP init: the {plan.head} head is too narrow to hold the probe; it starts at random", flush=True)
        return None
    info = {"train_features": int(len(train_labels)), "alpha": fitted.alpha, "temperature": fitted.temperature}
    if val is not None:
        info["val_accuracy"] = float(np.mean(fitted.predict(warmstart.pooled(val[0])) == val[1]))
    if trainer.verbose:
        shown = f", validation accuracy {info['val_accuracy']:.4f}" if "val_accuracy" in info else ""
        print(f"LP init: the head starts as the ridge probe on {len(train_labels)} training features{shown}",
              flush=True)
    return info


def _kept_line(name: str, monitor: str, kept: str, start: float, best: float | None, versus: dict | None) -> str:
    """``phase head: kept its best epoch (val_accuracy 0.96 > start 0.90; ...)``, or why it went back to its start."""
    test = ""
    if versus is not None:
        test = (f"; {versus['wins']} validation images better, {versus['losses']} worse, "
                f"sign test p={versus['p_value']:.2g}")
    if kept == "best epoch":
        return f"phase {name}: kept its best epoch ({monitor} {best:.4f} > start {start:.4f}{test})"
    if versus is not None:
        return (f"phase {name}: kept its start ({monitor} {start:.4f}; best epoch {best:.4f}, "
                f"not significantly better{test})")
    shown = f"best epoch {best:.4f}" if best is not None else "no epoch"
    return f"phase {name}: kept its start ({monitor} {start:.4f}; {shown} did not beat it)"
