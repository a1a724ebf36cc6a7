"""The backbone registry: trunks, cuts, in-model preprocessing, and BatchNormalization freezing."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from training.bases import (
    BASES, Backbone, all_layers, bn_layers, build_backbone, build_trunk, get_base, preprocess_layer,
    set_trunk_trainable,
)
from training.preprocess import Preprocess

EXPECTED_BASES = {"vgg16", "vgg19", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                  "efficientnet_b0", "inception_v3"}


def raw_images(count=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype(np.float32)


def test_registry_and_lookup():
    assert set(BASES) == EXPECTED_BASES
    assert get_base(" VGG16 ") is BASES["vgg16"]
    with pytest.raises(ValueError, match="inception_v3"):
        get_base("alexnet")


@pytest.mark.parametrize("name", sorted(EXPECTED_BASES))
def test_each_base_builds_at_its_minimum_size_with_its_block_ends(name):
    spec = BASES[name]
    trunk = build_trunk(spec, spec.min_size)
    names = [layer.name for layer in trunk.layers]
    positions = [names.index(end) for end in spec.block_ends]
    assert positions == sorted(positions)  # shallow to deep
    assert tuple(trunk.input.shape) == (None, spec.min_size, spec.min_size, 3)
    assert spec.weights_file.endswith(".h5") and spec.default_size >= spec.min_size
    assert not any(weight.path.startswith("predictions") for weight in trunk.weights)  # notop
    with pytest.raises(ValueError, match="at least"):
        build_trunk(spec, spec.min_size - 1)


def test_cut_layer_truncates_and_unknown_cut_names_choices():
    spec = BASES["vgg16"]
    trunk = build_trunk(spec, 32, cut_layer="block2_pool")
    assert trunk.output.shape[1:] == (8, 8, 128)
    assert [layer.name for layer in trunk.layers][-1] == "block2_pool"
    with pytest.raises(ValueError, match="block3_pool.*block1_conv1"):
        build_trunk(spec, 32, cut_layer="block9_pool")


@pytest.mark.parametrize("mode, reference", [
    ("caffe", keras.applications.vgg16.preprocess_input),
    ("tf", keras.applications.mobilenet_v2.preprocess_input),
    ("torch", keras.applications.densenet.preprocess_input),
    ("none", lambda x: x),
])
def test_preprocess_layer_matches_keras_preprocess_input(mode, reference):
    images = raw_images(3)
    expected = reference(images.copy())
    got = np.asarray(Preprocess(mode)(images))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
    assert got.dtype == np.float32
    with pytest.raises(ValueError):
        Preprocess("bgr")


def test_every_base_names_a_valid_preprocess_mode():
    for spec in BASES.values():
        assert preprocess_layer(spec).mode == spec.preprocess_mode
    assert BASES["vgg19"].preprocess_mode == BASES["resnet50"].preprocess_mode == "caffe"
    assert BASES["mobilenet_v2"].preprocess_mode == BASES["inception_v3"].preprocess_mode == "tf"
    assert BASES["efficientnet_b0"].preprocess_mode == BASES["mobilenet_v3_large"].preprocess_mode == "none"


def small_classifier(mode="caffe", size=16):
    inputs = keras.Input((size, size, 3), name="images")
    x = Preprocess(mode, name="preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=1))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed=2))(x)
    return keras.Model(inputs, outputs)


def test_preprocess_layer_survives_savedmodel_export_and_keras_saving(tmp_path):
    model = small_classifier()
    images = raw_images(4, 16)
    expected = np.asarray(model(images))
    assert np.ptp(expected, axis=0).max() > 1e-3  # outputs vary with the input
    model.export(str(tmp_path / "export"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(loaded.serve(tf.constant(images)).numpy(), expected, rtol=1e-5, atol=1e-5)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert reloaded.get_layer("preprocess").mode == "caffe"
    np.testing.assert_allclose(np.asarray(reloaded(images)), expected, rtol=1e-5, atol=1e-5)


def test_backbone_takes_raw_pixels_and_preprocesses_inside():
    spec = BASES["vgg16"]
    backbone = build_backbone(spec, (32, 48), "none", cut_layer="block3_pool")
    assert isinstance(backbone, Backbone) and backbone.source.kind == "none"
    assert tuple(backbone.model.input.shape) == (None, 32, 48, 3)
    assert backbone.trunk.layers[-1].name == "block3_pool"
    assert backbone.weights_report.loaded == [] and "block1_conv1" in backbone.weights_report.missing_in_model
    assert "block4_conv1" not in backbone.weights_report.missing_in_model
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 48, 3)).astype(np.float32)
    expected = backbone.trunk(keras.applications.vgg16.preprocess_input(images.copy()))
    np.testing.assert_allclose(np.asarray(backbone.model(images)), np.asarray(expected), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="block4_pool"):
        build_backbone(spec, 32, "none", cut_layer="nope")


def bn_trunk():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    x = keras.layers.ReLU(name="relu_a")(x)
    x = keras.layers.Conv2D(8, 3, name="conv_b")(x)
    x = keras.layers.BatchNormalization(name="bn_b")(x)
    return keras.Model(inputs, x, name="trunk")


def fit_one_step(trunk):
    inputs = keras.Input((16, 16, 3))
    x = trunk(inputs)  # no training=False: Keras 3.15's fit() would ignore it anyway (keras#20285)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(0, 255, (8, 16, 16, 3)).astype(np.float32), rng.integers(0, 2, 8),
              batch_size=8, epochs=1, verbose=0)


def snapshot(trunk):
    return {w.path: np.asarray(w).copy() for w in trunk.weights}


def test_bn_statistics_stay_fixed_when_the_trunk_is_unfrozen():
    trunk = bn_trunk()
    assert [layer.name for layer in bn_layers(trunk)] == ["bn_a", "bn_b"]
    trainable = set_trunk_trainable(trunk, [layer.name for layer in trunk.layers])
    assert trainable == ["conv_a", "conv_b"]
    assert all(not layer.trainable for layer in bn_layers(trunk))
    before = snapshot(trunk)
    fit_one_step(trunk)
    after = snapshot(trunk)
    for path in before:
        if "moving" in path or "gamma" in path or "beta" in path:
            assert np.array_equal(before[path], after[path]), path
    assert not np.array_equal(before["conv_a/kernel"], after["conv_a/kernel"])


def test_without_freezing_bn_statistics_move():
    # The control for the test above: the same step with BN trainable drifts the statistics.
    trunk = bn_trunk()
    trunk.trainable = True
    before = snapshot(trunk)
    fit_one_step(trunk)
    assert not np.array_equal(before["bn_a/moving_mean"], np.asarray(trunk.get_layer("bn_a").moving_mean))


def test_set_trunk_trainable_respects_the_list_and_rejects_unknown_names():
    trunk = bn_trunk()
    assert set_trunk_trainable(trunk, ["conv_b", "bn_b"]) == ["conv_b"]
    assert [layer.name for layer in all_layers(trunk) if layer.trainable_weights] == ["conv_b"]
    assert set_trunk_trainable(trunk, []) == [] and not trunk.trainable_weights
    with pytest.raises(ValueError, match="conv_z"):
        set_trunk_trainable(trunk, ["conv_z"])
