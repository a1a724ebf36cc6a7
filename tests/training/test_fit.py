"""Tests for training.fit: heads, the phase loop, feature caching, frozen BatchNormalization."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from training import bases, data, export, fit, phases, scenarios

SIZE = 32


def write_image_folder(root, classes=("dots", "stripes", "warm"), per_class=16, size=SIZE, seed=0):
    """Write a class-per-folder PNG set whose classes differ in colour and texture.

    Each class has its own base colour and pattern plus per-image noise, so a
    head on random-weight features can still tell them apart.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = [
        ((xx // 4 + yy // 4) % 2)[..., None] * np.array([40, 200, 60]),
        ((yy // 3) % 2)[..., None] * np.array([30, 60, 220]),
        np.ones((size, size, 1)) * np.array([230, 120, 20]),
    ]
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            image = patterns[index % len(patterns)] + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("images"))
    images = data.scan_image_folder(root)
    train, val = data.split_image_set(images, 0.25, seed=0)
    return train, val


def _weights_of(layers):
    return {layer.name + f"/{i}": np.array(w) for layer in layers for i, w in enumerate(layer.get_weights())}


def test_gap_and_seed_heads():
    head = phases.build_head("gap", 3, (2, 2, 8))
    assert [type(layer).__name__ for layer in head.layers[1:]] == [
        "Standardize", "GlobalAveragePooling2D", "Dropout", "Dense"]
    assert head.output.shape == (None, 3)
    seed = phases.build_head("seed", 4, (1, 1, 16))
    kinds = [(type(layer).__name__, getattr(layer, "units", None), getattr(layer, "rate", None))
             for layer in seed.layers[1:]]
    # The article's head: Flatten, Dense 1024 relu, Dropout 0.5, Dense 1024 relu, Dense softmax
    # (after the standardization that LP init sets).
    assert kinds == [("Standardize", None, None), ("Flatten", None, None), ("Dense", 1024, None),
                     ("Dropout", None, 0.5), ("Dense", 1024, None), ("Dense", 4, None)]
    assert [layer.activation.__name__ for layer in seed.layers if isinstance(layer, keras.layers.Dense)] == \
        ["relu", "relu", "softmax"]
    probs = seed(np.random.default_rng(0).normal(size=(5, 1, 1, 16)).astype(np.float32)).numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError):
        phases.build_head("mlp", 3, (2, 2, 8))
    with pytest.raises(ValueError):
        phases.build_head("gap", 1, (2, 2, 8))


def test_mixed_precision_keeps_the_softmax_in_float32_and_restores_the_policy():
    before = keras.config.dtype_policy().name
    with fit.precision_policy(True) as name:
        assert name == "mixed_float16"
        head = phases.build_head("seed", 3, (1, 1, 8))
        assert head.get_layer("fc1").compute_dtype == "float16"
        assert head.get_layer("predictions").compute_dtype == "float32"
        assert head(np.ones((2, 1, 1, 8), np.float32)).dtype == "float32"
    assert keras.config.dtype_policy().name == before


def test_optimizers_and_strategy_names():
    sgd = phases.make_optimizer("sgd", 1e-4, 0.9)
    assert isinstance(sgd, keras.optimizers.SGD)
    assert sgd.get_config()["momentum"] == pytest.approx(0.9)
    assert phases.make_optimizer("sgd", 1e-4, 0.9) is not sgd
    assert isinstance(phases.make_optimizer("adam", 1e-3), keras.optimizers.Adam)
    with pytest.raises(ValueError):
        phases.make_optimizer("lamb", 1e-3)
    with pytest.raises(ValueError):
        fit.make_strategy("tpu")


def test_scenario1_caches_features_and_assembles_the_trained_head(image_sets, tmp_path):
    train_set, val_set = image_sets
    spec = bases.get_base("vgg16")
    backbone = bases.build_backbone(spec, SIZE, "none")
    x, _ = data.load_arrays(val_set, (SIZE, SIZE))
    features = backbone.model(x, training=False).numpy()
    assert features.std(axis=0).mean() > 1e-4, "random trunk features must vary with the input"
    trunk_before = _weights_of(backbone.trunk.layers)
    plan = scenarios.plan_for(1, spec, head_epochs=4, head_lr=3e-3)
    options = phases.FitOptions(image_size=SIZE, batch_size=8, seed=1, augment_copies=1, verbose=0)

    result = fit.train(plan, backbone, train_set, val_set, options)

    [phase] = result.phases
    assert phase.cached_features and not phase.train_trunk
    assert result.metrics["cached_train_features"] == 2 * len(train_set)  # plain pass + 1 augmented copy
    assert len(phase.epoch_seconds) == phase.epochs_run == len(result.history["head"]["loss"])
    # The trunk never trained; the head did.
    for key, value in _weights_of(backbone.trunk.layers).items():
        np.testing.assert_array_equal(value, trunk_before[key])
    assert result.history["head"]["loss"][-1] < result.history["head"]["loss"][0]
    # Assembled by hand from the same pieces: preprocess, trunk, trained head.
    by_hand = result.head(backbone.trunk(bases.preprocess_layer(spec)(x)), training=False).numpy()
    np.testing.assert_allclose(result.model(x, training=False).numpy(), by_hand, atol=1e-5)
    # The better of the best epoch and the probe start was kept: the model scores what it scored.
    assert result.metrics["lp_init"] and phase.start_value is not None
    kept_value = phase.best_value if phase.kept == "best epoch" else phase.start_value
    assert result.metrics["val_accuracy"] == pytest.approx(kept_value, abs=1e-6)
    assert result.metrics["val_accuracy"] >= result.metrics["probe"]["val_accuracy"] - 1e-6
    assert phase.best_value == max(result.history["head"]["val_accuracy"])
    assert result.metrics["val_accuracy"] > 1 / 3  # better than chance on three distinct classes


def test_tensorboard_log_dir(image_sets, tmp_path):
    train_set, val_set = image_sets
    spec = bases.get_base("vgg16")
    backbone = bases.build_backbone(spec, SIZE, "none", cut_layer="block1_pool")
    options = phases.FitOptions(image_size=SIZE, batch_size=8, verbose=0, log_dir=str(tmp_path / "tb"))
    plan = scenarios.plan_for(1, spec, head_epochs=1)
    if not phases.tensorboard_available():
        with pytest.raises(ValueError, match="pip install tensorboard"):
            fit.train(plan, backbone, train_set, val_set, options)
        return
    fit.train(plan, backbone, train_set, val_set, options)
    events = list((tmp_path / "tb" / "head").rglob("events.out.tfevents.*"))
    assert events


def test_finetune_phases_fresh_optimizers_and_frozen_batchnorm(image_sets):
    train_set, val_set = image_sets
    spec = bases.get_base("resnet50")
    cut = "conv2_block3_out"  # an early cut keeps the run small; BN layers remain
    backbone = bases.build_backbone(spec, SIZE, "none", cut_layer=cut)
    bn = bases.bn_layers(backbone.trunk)
    assert bn
    moving_before = {layer.name: (np.array(layer.moving_mean), np.array(layer.moving_variance)) for layer in bn}
    plan = scenarios.plan_for(2, spec, cut_layer=cut, freeze_first=5, head_epochs=1, finetune_epochs=2)
    names = [layer.name for layer in backbone.trunk.layers]
    frozen_early = [backbone.trunk.get_layer(n) for n in names[:5] if backbone.trunk.get_layer(n).weights]
    tuned = [layer for layer in backbone.trunk.layers[5:]
             if isinstance(layer, keras.layers.Conv2D)]
    early_before, tuned_before = _weights_of(frozen_early), _weights_of(tuned)
    # Without LP-FT's keep-the-better rule, which could hand back the untouched start
    # (tests/training/test_warmstart.py covers that rule in a fine-tune phase).
    options = phases.FitOptions(image_size=SIZE, batch_size=12, seed=0, augment=False, verbose=0, lp_init=False)

    result = fit.train(plan, backbone, train_set, val_set, options)

    head_run, tune_run = result.phases
    assert head_run.cached_features and not tune_run.cached_features
    # A fresh optimizer per phase: distinct objects, the plan's kinds, own step counts.
    assert head_run.optimizer is not tune_run.optimizer
    assert isinstance(head_run.optimizer, keras.optimizers.Adam)
    assert isinstance(tune_run.optimizer, keras.optimizers.SGD)
    assert tune_run.optimizer.get_config()["momentum"] == pytest.approx(0.9)
    assert float(tune_run.optimizer.learning_rate) == pytest.approx(1e-4)
    steps = -(-len(train_set) // options.batch_size)
    assert int(head_run.optimizer.iterations) == steps * head_run.epochs_run
    # Restoring the best checkpoint also restores its optimizer step, never past this phase's own.
    assert 0 < int(tune_run.optimizer.iterations) <= steps * tune_run.epochs_run
    assert result.model.optimizer is tune_run.optimizer
    assert not any(layer.trainable for layer in bn)
    assert set(tune_run.trainable_trunk_layers) == {
        layer.name for layer in backbone.trunk.layers[5:]
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)}
    # BN moving statistics did not move although fit() ran with trainable conv layers.
    for layer in bn:
        np.testing.assert_array_equal(np.array(layer.moving_mean), moving_before[layer.name][0])
        np.testing.assert_array_equal(np.array(layer.moving_variance), moving_before[layer.name][1])
    for key, value in _weights_of(frozen_early).items():
        np.testing.assert_array_equal(value, early_before[key])
    changed = [key for key, value in _weights_of(tuned).items() if not np.array_equal(value, tuned_before[key])]
    assert changed, "the fine-tune phase must train the unfrozen convolutions"
    assert list(result.history) == ["head", "fine-tune"]


def test_mirrored_strategy_and_mixed_precision_on_cpu(image_sets, tmp_path):
    train_set, val_set = image_sets
    spec = bases.get_base("vgg16")
    options = phases.FitOptions(image_size=SIZE, batch_size=8, strategy="mirrored", verbose=0)
    with pytest.raises(ValueError, match="strategy_scope"):
        fit.train(scenarios.plan_for(1, spec, head_epochs=1), None, train_set, val_set, options)
    with fit.precision_policy(True), fit.strategy_scope("mirrored") as strategy:
        assert isinstance(strategy, tf.distribute.MirroredStrategy)
        backbone = bases.build_backbone(spec, SIZE, "none", cut_layer="block2_pool")
        result = fit.train(scenarios.plan_for(1, spec, head_epochs=1), backbone, train_set, val_set, options)
    assert keras.config.dtype_policy().name == "float32"
    out = result.model(np.full((2, SIZE, SIZE, 3), 100.0, np.float32), training=False)
    assert out.dtype == "float32"
    np.testing.assert_allclose(out.numpy().sum(axis=1), 1.0, rtol=1e-3)
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    # A model trained under both still exports, outside the scope, with float32 scores.
    path = export.export_version(result.model, train_set.class_names, tmp_path, "mixed", image_size=SIZE,
                                 lineage={})
    x, _ = data.load_arrays(val_set, (SIZE, SIZE))
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))["scores"]
    assert served.dtype == tf.float32
    np.testing.assert_allclose(served.numpy(), result.model(x, training=False).numpy(), atol=1e-5)
