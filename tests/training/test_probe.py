"""Linear probes at block ends: the ridge classifier against scikit-learn, and probes on a real trunk."""

import numpy as np
import pytest
import keras

from tests.training.conftest import class_image
from training.bases import build_backbone, get_base
from training.probe import ALPHAS, SCALE_FLOOR, BlockScore, block_features_model, fit_ridge, probe_blocks, ridge_probe, score_blocks
from sklearn import linear_model


def blobs(n_per_class=30, classes=3, dims=20, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dims))
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + rng.normal(0, spread, (len(labels), dims)), labels


def test_ridge_matches_scikit_learn_for_a_given_strength():
    x, y = blobs(spread=4.0)
    probe = fit_ridge(x, y, 3, alphas=[0.1])
    standardized = (x - x.mean(axis=0)) / probe.scale
    reference = linear_model.RidgeClassifier(alpha=probe.alpha).fit(standardized, y)
    np.testing.assert_allclose(probe.decision_function(x), reference.decision_function(standardized),
                               rtol=1e-6, atol=1e-8)


def test_leave_one_out_choice_matches_scikit_learn():
    x, y = blobs(n_per_class=12, dims=40, spread=6.0, seed=1)
    probe = fit_ridge(x, y, 3)
    standardized = (x - x.mean(axis=0)) / probe.scale
    unit = float(np.mean(np.linalg.svd(standardized, compute_uv=False) ** 2))
    reference = linear_model.RidgeClassifierCV(alphas=np.array(ALPHAS) * unit, scoring="accuracy")
    reference.fit(standardized, y)
    assert probe.alpha == pytest.approx(reference.alpha_)


def test_the_scale_is_the_standard_deviation_floored_for_near_dead_channels():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 2.0, (40, 3)), rng.normal(0, 1e-6, (40, 1))], axis=1)
    y = np.arange(40) % 2
    probe = fit_ridge(x, y, 2)
    floor = SCALE_FLOOR * x.std(axis=0).mean()
    np.testing.assert_allclose(probe.scale, np.sqrt(x.std(axis=0) ** 2 + floor ** 2))
    # The near-dead channel is divided by the floor, not by its own 1e-6.
    assert probe.scale[3] == pytest.approx(floor, rel=1e-6)


def test_ridge_separates_separable_classes_and_not_noise():
    x, y = blobs(spread=0.5)
    assert ridge_probe(x[::2], y[::2], x[1::2], y[1::2], 3) == 1.0
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(200, 30))
    labels = rng.integers(0, 2, 200)
    assert ridge_probe(noise[:100], labels[:100], noise[100:], labels[100:], 2) < 0.7
    constant = np.ones((10, 4))  # dead features must not divide by zero
    assert 0.0 <= ridge_probe(constant, np.arange(10) % 2, constant, np.arange(10) % 2, 2) <= 1.0


def class_images(per_class, size, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    return np.stack([class_image(label, (size, size), rng) for label in labels]).astype(np.float32), labels


def test_probe_blocks_on_a_vgg16_backbone():
    spec = get_base("vgg16")
    backbone = build_backbone(spec, 32, "none")
    x, y = class_images(12, 32, seed=0)
    vx, vy = class_images(6, 32, seed=1)
    scores = probe_blocks(backbone, x, y, vx, vy, spec.block_ends, seed=0)
    assert list(scores) == list(spec.block_ends)
    assert all(0.0 <= score <= 1.0 for score in scores.values())
    assert scores["block1_pool"] >= 0.9  # colour and stripes are linear in early features
    assert probe_blocks(backbone, x, y, vx, vy, spec.block_ends, seed=1) == scores  # deterministic


def test_leave_one_out_accuracy_is_what_refitting_without_each_image_scores():
    x, y = blobs(n_per_class=8, dims=12, spread=5.0, seed=3)
    fitted = fit_ridge(x, y, 3)
    # Exact LOO: with the same strength, standardization and intercept refitted without image i.
    hits = 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        rest = (x[keep] - x.mean(axis=0)) / fitted.scale
        reference = linear_model.RidgeClassifier(alpha=fitted.alpha).fit(rest, y[keep])
        hits += int(reference.predict(((x[i] - x.mean(axis=0)) / fitted.scale)[None])[0] == y[i])
    assert fitted.loo_accuracy == pytest.approx(hits / len(x))


def test_block_scores_pool_validation_and_leave_one_out_training_predictions():
    score = BlockScore(val_accuracy=0.9, train_loo_accuracy=0.6, val_count=10, train_count=30)
    assert score.accuracy == pytest.approx((9 + 18) / 40)
    assert score.describe()["accuracy"] == score.accuracy and score.describe()["train_images"] == 30
    spec = get_base("vgg16")
    backbone = build_backbone(spec, 32, "none", cut_layer="block2_pool")
    x, y = class_images(6, 32, seed=0)
    vx, vy = class_images(4, 32, seed=1)
    scores = score_blocks(backbone, x, y, vx, vy, ["block1_pool", "block2_pool"])
    assert {k: v.val_accuracy for k, v in scores.items()} == probe_blocks(
        backbone, x, y, vx, vy, ["block1_pool", "block2_pool"])
    assert all(v.train_count == len(y) and v.val_count == len(vy) for v in scores.values())


def test_probe_features_come_from_preprocessed_pixels():
    spec = get_base("vgg16")
    backbone = build_backbone(spec, 32, "none", cut_layer="block2_pool")
    features = block_features_model(backbone, ["block1_pool", "block2_pool"])
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    first, second = features(images)
    inner = keras.Model(backbone.trunk.input, backbone.trunk.get_layer("block1_pool").output)
    expected = np.asarray(inner(keras.applications.vgg16.preprocess_input(images.copy()))).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(first), expected, rtol=1e-5, atol=1e-4)
    assert np.asarray(second).shape == (2, 128)


def test_probe_blocks_takes_a_plain_trunk_and_checks_its_inputs():
    inputs = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(4, 3, activation="relu", name="stage1")(inputs)
    b = keras.layers.Conv2D(6, 3, activation="relu", name="stage2")(a)
    trunk = keras.Model(inputs, b)
    x, y = class_images(8, 16, seed=2)
    scores = probe_blocks(trunk, x / 255.0, y, x / 255.0, y, ["stage1", "stage2"], seed=0)
    assert set(scores) == {"stage1", "stage2"}
    with pytest.raises(ValueError, match="stage9"):
        probe_blocks(trunk, x, y, x, y, ["stage9"], seed=0)
    with pytest.raises(ValueError):
        probe_blocks(trunk, x, y[:-1], x, y, ["stage1"], seed=0)
