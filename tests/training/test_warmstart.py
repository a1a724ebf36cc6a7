"""LP-FT: the head starts as the ridge probe, and no phase ends below where it started."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image

from graft import contract
from tests.training.test_fit import SIZE, write_image_folder
from training import bases, data, evaluate, fit, phases, pipeline, probe, scenarios, warmstart


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def trunk_features(tmp_path_factory):
    """(train features, labels, validation features, labels) of a random-weight VGG16 cut at block2_pool."""
    root = write_image_folder(tmp_path_factory.mktemp("lp"), per_class=14, seed=3)
    train, val = data.split_image_set(data.scan_image_folder(root), 0.4, seed=0)
    keras.utils.set_random_seed(0)
    backbone = bases.build_backbone(bases.get_base("vgg16"), SIZE, "none", cut_layer="block2_pool")
    arrays = [data.load_arrays(part, (SIZE, SIZE)) for part in (train, val)]
    (x, y), (vx, vy) = [(backbone.model.predict(images, verbose=0), labels) for images, labels in arrays]
    assert x.std(axis=0).mean() > 1e-4, "random trunk features must vary with the input"
    return x, y, vx, vy


@pytest.mark.parametrize("kind", ["gap", "seed"])
def test_lp_init_reproduces_the_probes_predictions_on_validation_features(trunk_features, kind):
    x, y, vx, vy = trunk_features
    keras.utils.set_random_seed(1)
    head = phases.build_head(kind, 3, x.shape[1:], seed=1)
    fitted = warmstart.init_head(head, kind, x, y, 3)

    reference = probe.fit_ridge(warmstart.pooled(x), y, 3)
    np.testing.assert_allclose(fitted.weights, reference.weights)
    expected = _softmax(reference.logits(warmstart.pooled(vx)))
    got = head.predict(vx, verbose=0)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(axis=1), reference.predict(warmstart.pooled(vx)))
    # The scores vary with the input (a constant head would match a constant probe).
    assert got.std(axis=0).max() > 0.05
    # The temperature sharpens without changing a prediction.
    assert reference.temperature != 1.0
    np.testing.assert_array_equal(reference.logits(vx.mean(axis=(1, 2))).argmax(axis=1),
                                  reference.decision_function(vx.mean(axis=(1, 2))).argmax(axis=1))


def test_a_seed_head_too_narrow_for_the_probe_keeps_its_random_start(trunk_features):
    x, y, _, _ = trunk_features
    # 1024 hidden units cannot pass 2 x 600 logits through.
    head = phases.build_head("seed", 600, x.shape[1:])
    before = [np.array(w) for w in head.get_weights()]
    assert warmstart.init_head(head, "seed", x, y, 600) is None
    for old, new in zip(before, head.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_pooled_averages_every_axis_between_batch_and_channels():
    features = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.testing.assert_allclose(warmstart.pooled(features), features.mean(axis=(1, 2)))
    np.testing.assert_array_equal(warmstart.pooled(features[:, 0, 0]), features[:, 0, 0])
    with pytest.raises(ValueError):
        warmstart.pooled(np.zeros(3))


def test_standardize_starts_as_the_identity_and_refuses_a_zero_scale():
    layer = phases.Standardize()
    x = np.random.default_rng(0).normal(size=(4, 2, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(layer(x).numpy(), x)
    layer.set_statistics([1.0, 2.0, 3.0], [2.0, 2.0, 4.0])
    np.testing.assert_allclose(layer(x).numpy(), (x - [1.0, 2.0, 3.0]) / [2.0, 2.0, 4.0], rtol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        layer.set_statistics([0.0] * 3, [1.0, 0.0, 1.0])


def _write_faint_classes(root, per_class: int, seed: int) -> str:
    """Three classes told apart by a faint tint under heavy noise: no probe gets all of them."""
    rng = np.random.default_rng(seed)
    for label in range(3):
        (root / f"c{label}").mkdir(parents=True)
        for index in range(per_class):
            image = np.full((SIZE, SIZE, 3), 120.0)
            image[..., label] += 8.0
            image += rng.normal(0.0, 80.0, image.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"c{label}" / f"{index}.png")
    return str(root)


@pytest.fixture(scope="module")
def noisy_sets(tmp_path_factory):
    """Train and validation folders where the probe is good but not perfect on validation."""
    root = tmp_path_factory.mktemp("noisy")
    return _write_faint_classes(root / "train", 10, seed=5), _write_faint_classes(root / "val", 8, seed=6)


def test_a_head_that_training_makes_worse_ends_as_the_probe_start(noisy_sets):
    train_set, val_set = (data.scan_image_folder(path) for path in noisy_sets)
    spec = bases.get_base("vgg16")
    keras.utils.set_random_seed(0)
    backbone = bases.build_backbone(spec, SIZE, "none", cut_layer="block2_pool")
    # A learning rate no head survives: every epoch is worse than the probe it started from.
    plan = scenarios.plan_for(3, spec, cut_layer="block2_pool", head_epochs=3, head_lr=1e4)
    options = phases.FitOptions(image_size=SIZE, batch_size=8, seed=0, augment=False, head_patience=3, verbose=0)

    result = fit.train(plan, backbone, train_set, val_set, options)

    [phase] = result.phases
    assert phase.kept == "start"
    assert max(result.history["head"]["val_accuracy"]) < phase.start_value
    assert result.metrics["val_accuracy"] == pytest.approx(result.metrics["probe"]["val_accuracy"], abs=1e-6)
    # The head is the probe-initialised one: it predicts what a fresh LP init predicts.
    vx, _ = data.load_arrays(val_set, (SIZE, SIZE))
    features = backbone.model.predict(vx, verbose=0)
    fresh = phases.build_head("gap", 3, features.shape[1:])
    tx, ty = data.load_arrays(train_set, (SIZE, SIZE))
    warmstart.init_head(fresh, "gap", backbone.model.predict(tx, verbose=0), ty, 3)
    np.testing.assert_allclose(result.head.predict(features, verbose=0), fresh.predict(features, verbose=0),
                               atol=1e-5)


def test_a_fine_tune_phase_that_only_hurts_hands_back_its_start(noisy_sets):
    train_set, val_set = (data.scan_image_folder(path) for path in noisy_sets)
    spec = bases.get_base("vgg16")
    keras.utils.set_random_seed(0)
    backbone = bases.build_backbone(spec, SIZE, "none", cut_layer="block2_pool")
    # A learning rate no trunk survives.
    plan = scenarios.plan_for(2, spec, cut_layer="block2_pool", head_epochs=2, finetune_epochs=2,
                              finetune_lr=1e4)
    options = phases.FitOptions(image_size=SIZE, batch_size=8, seed=0, augment=False, patience=2, verbose=0)
    # The head phase leaves the trunk alone, so these are the trunk's weights when fine-tuning starts.
    trunk_start = [np.array(w) for w in backbone.trunk.get_weights()]

    result = fit.train(plan, backbone, train_set, val_set, options)

    _, tune_run = result.phases
    assert tune_run.kept == "start" and max(result.history["fine-tune"]["val_accuracy"]) < tune_run.start_value
    for before, after in zip(trunk_start, backbone.trunk.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert result.metrics["val_accuracy"] == pytest.approx(tune_run.start_value, abs=1e-6)
    assert result.metrics["val_accuracy"] >= result.metrics["probe"]["val_accuracy"] - 1e-6


def test_the_exported_model_is_the_probe_start_when_training_only_hurts(noisy_sets, tmp_path, capsys):
    train_dir, val_dir = noisy_sets
    config = pipeline.FitConfig(
        data=train_dir, val_data=val_dir, repo=tmp_path / "repo", model_name="lp", base="vgg16", weights="none",
        scenario="3", cut_layer="block2_pool", image_size=SIZE, head_epochs=3, head_lr=1e4, head_patience=3,
        augment=False, run_dir=tmp_path / "run")

    path = pipeline.run(config)

    out = capsys.readouterr().out
    lineage = contract.read_lineage(path)
    probe_accuracy = lineage["metrics"]["probe"]["val_accuracy"]
    assert lineage["metrics"]["phases"][0]["kept"] == "start"
    # Scored through the SavedModel, as served: exactly the probe's validation accuracy, and printed.
    served = evaluate.evaluate_savedmodel(path, data.scan_image_folder(val_dir))
    assert served.accuracy == pytest.approx(probe_accuracy)
    assert f"linear probe {probe_accuracy * 100:.1f} %" in out
    assert f"exported model {served.accuracy * 100:.1f} %" in out


def test_a_best_epoch_replaces_its_start_only_when_a_sign_test_says_it_is_better():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    start = np.array([0, 1, 2, 0, 0, 0, 0, 0])
    best = np.array([0, 1, 2, 1, 1, 2, 0, 1])
    assert phases.versus_start(best, start, labels) == (3, 1)
    assert phases.sign_test(3, 1) == pytest.approx(5 / 16)
    assert phases.sign_test(0, 0) == 1.0
    # One or two images better, out of a hundred, is what the best of many epochs gets by chance.
    assert not phases.keeps_best(2, 0)["best"] and not phases.keeps_best(4, 0)["best"]
    assert phases.keeps_best(5, 0)["best"] and phases.keeps_best(5, 0)["p_value"] == pytest.approx(1 / 32)
    assert not phases.keeps_best(9, 4)["best"] and phases.keeps_best(12, 2)["best"]
    assert not phases.keeps_best(0, 5)["best"]
