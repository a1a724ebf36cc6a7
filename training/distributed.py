"""Multi-worker training: MultiWorkerMirroredStrategy with a custom ``strategy.run`` loop.

Keras 3 ``model.fit`` fails under ``tf.distribute.MultiWorkerMirroredStrategy``
(tensorflow/tensorflow#72388: a reduce of PerReplica values, "Invalid reduction
dimension 0"), so this module trains the same FreezePlan phases as
:func:`training.fit.train` with its own loop:

- the cluster comes from ``TF_CONFIG``, read before the strategy is built (TF
  configures collective ops once, at program start-up);
- the model (the backbone the caller built in the strategy's scope, plus the
  head) lives in ``strategy.scope()``; each phase sets the trunk's trainable
  layers through training.phases (BatchNormalization always frozen), gets a
  fresh optimizer, and trains with a ``tf.function`` step run by
  ``strategy.run``; the loss is ``tf.nn.compute_average_loss`` over the global
  batch, and Keras' optimizer all-reduces the gradients;
- each worker reads only its own shard of the images (explicit sharding by
  worker through ``distribute_datasets_from_function``); datasets repeat and every
  worker runs the same number of steps per epoch, so no collective waits for a
  worker that ran out of data;
- the epoch's validation is sharded too and its sums are all-reduced, so every
  worker takes the same best-epoch and early-stopping decision;
- only the chief (task type ``chief``, or worker 0 when there is none) writes
  checkpoints and the export; the other workers write theirs to temporary paths
  that are removed (the save still runs on every worker, as tf.distribute asks);
- LP-FT as in training.fit: every worker's pooled training features are
  all-gathered, the head starts as the ridge probe on all of them (the chief's
  start broadcast, so that no worker differs in a last bit), and a phase that
  does not beat its start on the all-reduced validation (accuracy, then the
  sign test over all-reduced disagreement counts) hands the start back.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from training import data, export, phases, warmstart
from training.cluster import Task, read_task
from training.phases import FitOptions, PhaseRun, TrainResult


def make_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """Build the strategy from ``TF_CONFIG``: call it before TensorFlow runs anything else.

    It starts this task's server and joins the cluster; the first collective
    (creating the first variable) waits until every worker has joined.
    ValueError when ``TF_CONFIG`` is missing or wrong, or when the process
    already ran TensorFlow ops (collectives are configured at start-up).
    """
    read_task()
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        raise ValueError(f"multiworker: the strategy must be built before TensorFlow runs anything "
                         f"in this process ({exc})") from exc


def current_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """The MultiWorkerMirroredStrategy whose scope is active; ValueError otherwise."""
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError("strategy 'multiworker': build the backbone and call train() inside "
                         "fit.strategy_scope('multiworker')")
    return strategy


@contextlib.contextmanager
def write_dir(path: str | os.PathLike | None, task: Task, prefix: str) -> Iterator[Path]:
    """The directory this task writes to: ``path`` on the chief, a temporary one elsewhere.

    Temporary directories (non-chief tasks, and the chief when ``path`` is None)
    are removed when the block exits, whatever happens inside it.
    """
    if task.is_chief and path is not None:
        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    temporary = Path(tempfile.mkdtemp(prefix=f"{prefix}{task.type}-{task.index}-"))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def model_strategy(model: keras.Model) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The MultiWorkerMirroredStrategy that ``model``'s variables were created in; ValueError otherwise."""
    for variable in model.weights:
        strategy = getattr(getattr(variable, "value", variable), "distribute_strategy", None)
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return strategy
    raise ValueError(f"model {model.name!r} was not built inside fit.strategy_scope('multiworker')")


def export_version(model: keras.Model, class_names, repo: str | os.PathLike, model_name: str,
                   **kwargs) -> str | None:
    """:func:`training.export.export_version` on every worker; only the chief's lands in ``repo``.

    The other workers export into a temporary repository that is removed at
    once, and get None; the chief gets the version's path. Every worker then
    waits for the others, so that none leaves the cluster while the chief
    still writes. ``kwargs`` are export_version's keyword arguments.
    """
    strategy = model_strategy(model)
    task = read_task()
    path = None
    if task.is_chief:
        path = export.export_version(model, class_names, repo, model_name, **kwargs)
    else:
        with write_dir(None, task, "graft-export-") as scratch:
            export.export_version(model, class_names, scratch, model_name, **kwargs)
    with strategy.scope():
        sum_across_workers(strategy, [1.0])  # a barrier: a failed chief export fails the others here
    return path


def weights_digest(model: keras.Model) -> str:
    """sha256 over the model's variables (paths, shapes, bytes): equal on workers that stayed in sync."""
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{variable.path}:{value.dtype}:{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _shard(images, index: int, count: int):
    """Every ``count``-th image from ``index`` (stratified enough: files are in class order)."""
    return data.ImageSet(images.root, list(images.class_names), images.files[index::count],
                         images.labels[index::count], [])


def sum_across_workers(strategy: tf.distribute.Strategy, values) -> np.ndarray:
    """All-reduce (sum) a small float vector that each worker computed locally.

    Called from the cross-replica context by every worker, in the same order.
    Each local replica carries an equal share so that the replicas' sum is the
    worker's value, whatever the number of local devices.
    """
    local = np.asarray(values, np.float64) / len(strategy.extended.worker_devices)
    share = tf.constant(local)
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: share)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def make_train_step(strategy: tf.distribute.Strategy, target: keras.Model,
                    optimizer: keras.optimizers.Optimizer):
    """A tf.function taking a distributed iterator: one synchronous step on every replica.

    Returns the global (loss sum, correct predictions, examples) of the step,
    identical on every worker.
    """
    variables = target.trainable_variables

    def replica_step(images, labels):
        context = tf.distribute.get_replica_context()
        # The batches of a step can differ in size (the end of a worker's shard):
        # average over the examples that all replicas together saw.
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
        with tf.GradientTape() as tape:
            probs = tf.cast(target(images, training=True), tf.float32)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, probs)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=tf.cast(global_count, tf.int64))
            # The identity, except under a LossScaleOptimizer (mixed precision).
            scaled = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, variables)
        # Keras' TF optimizer all-reduces (sums) the gradients in replica context.
        optimizer.apply_gradients(zip(gradients, variables))
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32)), tf.float32))
        return tf.reduce_sum(per_example), correct, count

    @tf.function
    def step(iterator):
        images, labels = next(iterator)
        results = strategy.run(replica_step, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in results]

    return step


def _local_scores(forward, dataset: tf.data.Dataset | None) -> np.ndarray:
    """(correct, summed cross-entropy, examples) of ``forward`` (inputs -> probabilities) over a local dataset."""
    totals = np.zeros(3, np.float64)
    if dataset is None:
        return totals
    for images, labels in dataset:
        probs = tf.cast(forward(images), tf.float32).numpy()
        labels = labels.numpy()
        picked = probs[np.arange(len(labels)), labels]
        totals += (float(np.sum(probs.argmax(axis=-1) == labels)),
                   float(-np.log(np.clip(picked, 1e-7, 1.0)).sum()), len(labels))
    return totals


class _Run:
    """The datasets and validation shared by the phases of one multi-worker run."""

    def __init__(self, strategy, task: Task, backbone, train_images, val_images, options: FitOptions):
        self.strategy = strategy
        self.task = task
        self.backbone = backbone
        self.options = options
        self.size = data.image_hw(options.image_size)
        self.replicas = strategy.num_replicas_in_sync
        if options.batch_size % self.replicas:
            raise ValueError(f"--batch-size {options.batch_size} is the global batch: it must be a multiple "
                             f"of the {self.replicas} replicas in sync")
        self.per_replica = options.batch_size // self.replicas
        if len(train_images.files) < task.workers:
            raise ValueError(f"{len(train_images.files)} training images cannot feed {task.workers} workers")
        self.train_shard = _shard(train_images, task.position, task.workers)
        self.val_shard = None
        if val_images is not None and len(val_images.files):
            self.val_shard = _shard(val_images, task.position, task.workers)
        self.has_val = val_images is not None and len(val_images.files) > 0
        self._features = None
        self._plain: tuple[np.ndarray, np.ndarray] | None = None
        self._forward: dict[int, tf.types.experimental.GenericFunction] = {}

    def _local(self, images, *, training, augment, seed=None):
        return data.make_dataset(images, self.size, self.per_replica, training=training,
                                 seed=self.options.seed if seed is None else seed, augment=augment)

    def _worker_seed(self, offset=0) -> int:
        # Different shuffles and augmentations per worker, reproducible per seed.
        return self.options.seed + offset + 10_000 * self.task.position

    def image_val(self) -> tf.data.Dataset | None:
        """This worker's validation shard as images (None when the shard is empty)."""
        if self.val_shard is None or not len(self.val_shard.files):
            return None
        return self._local(self.val_shard, training=False, augment=False)

    def image_data(self):
        """(distributed repeating train dataset, this worker's validation images or None)."""
        train = self._local(self.train_shard, training=True, augment=self.options.augment,
                            seed=self._worker_seed()).repeat()
        return self._distribute(train), self.image_val()

    def plain_features(self) -> tuple[np.ndarray, np.ndarray]:
        """This worker's shard as trunk features without augmentation, and its labels, computed once."""
        if self._plain is None:
            plain = self._local(self.train_shard, training=False, augment=False)
            self._plain = phases.extract_features(self.backbone.model, plain)
        return self._plain

    def feature_data(self):
        """The same for the trunk's features of this worker's shard, computed once per run."""
        if self._features is None:
            model = self.backbone.model
            parts = [self.plain_features()]
            for copy in range(self.options.augment_copies):
                augmented = self._local(self.train_shard, training=True, augment=True,
                                        seed=self._worker_seed(1000 * (copy + 1)))
                parts.append(phases.extract_features(model, augmented))
            features = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            val = None
            if self.val_shard is not None and len(self.val_shard.files):
                val = phases.extract_features(model, self._local(self.val_shard, training=False, augment=False))
            self._features = (features, labels, val)
        features, labels, val = self._features
        train = (tf.data.Dataset.from_tensor_slices((features, labels))
                 .shuffle(len(labels), seed=self._worker_seed(), reshuffle_each_iteration=True)
                 .batch(self.per_replica).repeat().prefetch(tf.data.AUTOTUNE))
        val_ds = (tf.data.Dataset.from_tensor_slices(val).batch(self.per_replica)
                  if val is not None else None)
        return self._distribute(train), val_ds

    def cached_examples(self) -> int:
        """Feature rows over all workers (0 until features were computed)."""
        if self._features is None:
            return 0
        return int(sum_across_workers(self.strategy, [len(self._features[1])])[0])

    def _distribute(self, dataset: tf.data.Dataset):
        workers = self.task.workers

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            if context.num_input_pipelines != workers:
                raise ValueError(f"the strategy has {context.num_input_pipelines} input pipelines "
                                 f"but TF_CONFIG lists {workers} workers")
            return dataset

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def steps_per_epoch(self, examples: int) -> int:
        """Steps for one pass over ``examples`` (all workers' together) at the global batch size."""
        return max(1, math.ceil(examples / self.options.batch_size))

    def fit_epochs(self, phase, target, step, iterator, steps, val_ds, monitor, checkpoint, writer, verbose,
                   start_value: float | None = None):
        """The epochs of one phase, with best-epoch checkpoints and early stopping.

        With ``start_value`` only an epoch that beats it is checkpointed.
        Returns (history, seconds per epoch, best epoch or None, best monitored value).
        """
        logs: dict[str, list[float]] = {}
        epoch_seconds: list[float] = []
        best_value, best_epoch, wait = (-math.inf if start_value is None else start_value), None, 0
        for epoch in range(phase.epochs):
            epoch_start = time.perf_counter()
            totals = np.zeros(3, np.float64)
            for _ in range(steps):
                totals += [float(v) for v in step(iterator)]
            values = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
            scores = self.validate(target, val_ds)
            if scores is not None:
                values.update({"val_loss": scores["loss"], "val_accuracy": scores["accuracy"]})
            epoch_seconds.append(time.perf_counter() - epoch_start)
            for key, value in values.items():
                logs.setdefault(key, []).append(float(value))
            if writer is not None:
                with writer.as_default(step=epoch):
                    for key, value in values.items():
                        tf.summary.scalar(key, value)
            if verbose:
                shown = " - ".join(f"{k}: {v:.4f}" for k, v in values.items())
                print(f"[{self.task.type} {self.task.index}] {phase.name} epoch {epoch + 1}/{phase.epochs} "
                      f"- {shown} - {epoch_seconds[-1]:.2f}s", flush=True)
            # Every worker sees the same all-reduced values, so all take the same branch
            # (and the checkpoint writes, which read variables, stay in step).
            if values[monitor] > best_value:
                best_value, best_epoch, wait = values[monitor], epoch, 0
                target.save_weights(str(checkpoint))
            else:
                wait += 1
                if wait >= self.options.patience_for(phase):
                    break
        return logs, epoch_seconds, best_epoch, best_value

    def local_predictions(self, model, val_ds) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, true) labels of this worker's validation shard (empty when it has none)."""
        if val_ds is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return phases.predicted_labels(model, val_ds)

    def validate(self, model, val_ds) -> dict[str, float] | None:
        """Accuracy and loss over every worker's validation shard (identical on every worker)."""
        if not self.has_val:
            return None
        if id(model) not in self._forward:
            # One function per model for the whole run: a new one per epoch would retrace each time.
            self._forward[id(model)] = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        correct, loss, count = sum_across_workers(self.strategy, _local_scores(self._forward[id(model)], val_ds))
        return {"accuracy": correct / count, "loss": loss / count} if count else None


def _make_optimizer(phase) -> tuple[keras.optimizers.Optimizer, keras.optimizers.Optimizer]:
    """(optimizer to apply, the phase's own optimizer); a loss-scale wrapper under mixed precision."""
    inner = phases.make_optimizer(phase.optimizer, phase.learning_rate, phase.momentum)
    if keras.config.dtype_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(inner), inner
    return inner, inner


def train(plan, backbone, train_images, val_images, options: FitOptions) -> TrainResult:
    """Run every phase of ``plan`` on every worker of the ``TF_CONFIG`` cluster.

    Call it inside ``fit.strategy_scope("multiworker")`` on every worker, with
    the backbone built in that scope, the same arguments everywhere, and
    ``options.strategy == "multiworker"``. ``options.batch_size`` is the global
    batch (split over all replicas). Each phase keeps its best epoch (by
    validation accuracy, else training accuracy); checkpoints go to
    ``options.checkpoint_dir`` on the chief only. ``metrics["distribution"]``
    records the cluster, the steps and this worker's ``weights_digest``.
    """
    strategy = current_strategy()
    task = read_task()
    phases.check_run(plan, options)
    keras.utils.set_random_seed(options.seed)
    run = _Run(strategy, task, backbone, train_images, val_images, options)
    verbose = phases.progress_verbosity(options.verbose)
    head, full = phases.assemble(plan, backbone, len(train_images.class_names), options, strategy)
    probe_info = _start_from_probe(run, plan, head, train_images) if options.lp_init else None

    monitor = "val_accuracy" if run.has_val else "accuracy"
    history: dict[str, dict[str, list[float]]] = {}
    runs = []
    with contextlib.ExitStack() as stack:
        checkpoint_dir = stack.enter_context(write_dir(options.checkpoint_dir, task, "graft-ckpt-"))
        log_dir = options.log_dir if task.is_chief else None
        for index, phase in enumerate(plan.phases):
            trainable = phases.set_phase_trainable(plan, backbone, phase)
            cached = phases.uses_cached_features(plan, options, phase)
            target = head if cached else full
            with strategy.scope():
                optimizer, phase_optimizer = _make_optimizer(phase)
                # Slots are created here, in the cross-replica context, not inside the step.
                optimizer.build(target.trainable_variables)
            train_ds, val_ds = run.feature_data() if cached else run.image_data()
            examples = len(train_images.files) * (1 + options.augment_copies if cached else 1)
            steps = run.steps_per_epoch(examples)
            step = make_train_step(strategy, target, optimizer)
            checkpoint = checkpoint_dir / f"{index:02d}-{phase.name}.weights.h5"
            writer = (tf.summary.create_file_writer(str(Path(log_dir) / phase.name)) if log_dir else None)
            if verbose:
                print(f"[{task.type} {task.index}] {phases.phase_title(index, plan, phase, cached, trainable)}, "
                      f"{steps} steps/epoch over {task.workers} workers", flush=True)
            start_value, start_weights, start_predictions = None, None, None
            if options.lp_init and run.has_val:
                start_value = run.validate(target, val_ds)["accuracy"]
                start_weights = target.get_weights()
                start_predictions = run.local_predictions(target, val_ds)
            checkpoint.unlink(missing_ok=True)  # a reused --checkpoint-dir must not leak an old best
            started = time.perf_counter()
            logs, epoch_seconds, best_epoch, best_value = run.fit_epochs(
                phase, target, step, iter(train_ds), steps, val_ds, monitor, checkpoint, writer, verbose,
                start_value)
            seconds = time.perf_counter() - started
            if writer is not None:
                writer.close()
            kept, versus = "best epoch", None
            if checkpoint.exists():
                target.load_weights(str(checkpoint))
                if start_weights is not None:
                    predicted, labels = run.local_predictions(target, val_ds)
                    local = phases.versus_start(predicted, start_predictions[0], labels)
                    wins, losses = (int(round(v)) for v in sum_across_workers(strategy, local))
                    versus = phases.keeps_best(wins, losses)
                    if not versus["best"]:
                        # The counts are all-reduced: every worker decides alike.
                        target.set_weights(start_weights)
                        kept = "start"
            elif start_weights is not None:
                # Every worker took the same branch (all-reduced scores), so all restore alike.
                target.set_weights(start_weights)
                kept = "start"
            history[phase.name] = logs
            runs.append(PhaseRun(
                name=phase.name, train_trunk=phase.train_trunk, cached_features=cached,
                optimizer=phase_optimizer, epochs_run=len(epoch_seconds), best_epoch=best_epoch,
                best_value=None if best_epoch is None else float(best_value), monitor=monitor,
                seconds=seconds, epoch_seconds=epoch_seconds, trainable_trunk_layers=trainable,
                frozen_trunk_layers=phases.frozen_trunk_layers(backbone, trainable),
                start_value=start_value, kept=kept, versus_start=versus))

    metrics = {
        "train_images": len(train_images.files),
        "val_images": len(val_images.files) if run.has_val else 0,
        "cached_train_features": run.cached_examples(),
        "lp_init": probe_info is not None,
        "phases": [item.to_dict() for item in runs],
    }
    if probe_info is not None:
        metrics["probe"] = probe_info
    if run.has_val:
        scores = run.validate(full, run.image_val())
        metrics.update({"val_accuracy": scores["accuracy"], "val_loss": scores["loss"]})
    metrics["distribution"] = {
        "strategy": "multiworker", "task": task.describe(), "workers": task.workers,
        "replicas_in_sync": run.replicas, "global_batch_size": options.batch_size,
        "weights_digest": weights_digest(full),
    }
    return TrainResult(model=full, head=head, history=history, metrics=metrics, phases=runs)


def _gather_pooled(run: _Run, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's pooled plain training features and labels, in image order, identical on every worker."""
    features, labels = run.plain_features()
    pooled = warmstart.pooled(features)
    channels = pooled.shape[1]
    rows = np.zeros((total, channels + 1))
    # A worker's shard is every workers-th image from its position (_shard): its rows go back there.
    rows[run.task.position::run.task.workers, :channels] = pooled
    rows[run.task.position::run.task.workers, channels] = labels
    gathered = sum_across_workers(run.strategy, rows.ravel()).reshape(total, channels + 1)
    return gathered[:, :channels], np.rint(gathered[:, channels]).astype(np.int64)


def _broadcast_from_chief(run: _Run, model: keras.Model) -> None:
    """Set ``model``'s weights to the chief's on every worker (an all-reduce where only the chief adds)."""
    values = model.get_weights()
    flat = np.concatenate([np.ravel(v) for v in values]).astype(np.float64)
    summed = sum_across_workers(run.strategy, flat if run.task.is_chief else np.zeros_like(flat))
    restored, offset = [], 0
    for value in values:
        restored.append(summed[offset:offset + value.size].reshape(value.shape).astype(value.dtype))
        offset += value.size
    model.set_weights(restored)


def _start_from_probe(run: _Run, plan, head: keras.Model, train_images) -> dict | None:
    """LP-FT's start on every worker: the head as the ridge probe on all workers' training features."""
    features, labels = _gather_pooled(run, len(train_images.files))
    fitted = warmstart.init_head(head, plan.head, features, labels, len(train_images.class_names))
    if fitted is None:
        return None
    # Each worker fitted the same probe; a different BLAS could still differ in a last bit.
    _broadcast_from_chief(run, head)
    info = {"train_features": int(len(labels)), "alpha": fitted.alpha, "temperature": fitted.temperature}
    if run.has_val:
        _, val_ds = run.feature_data()
        info["val_accuracy"] = run.validate(head, val_ds)["accuracy"]
    return info
