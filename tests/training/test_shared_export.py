"""A frozen-trunk export also carries its trunk and head apart (graft.contract's shared trunks).

For every version signature S: version[S](x) == head[S](trunk[SHARED_SIGNATURES[S]](x)),
on float images, encoded images and tf.Examples alike; versions whose trunk trained
carry neither part.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from graft import contract
from serving import servable as servable_module
from tests.models import export_shared_trunk_version, image_example, png_bytes
from tests.training.test_fit import write_image_folder
from training import export, pipeline, repo

SIZE = 32


def _inputs(seed: int, size: int = SIZE) -> dict[str, dict[str, tf.Tensor]]:
    """Each version signature's inputs: noise, a flat grey, a gradient, and a larger image to resize."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3)).astype(np.uint8),
              np.full((size, size, 3), 128, np.uint8),
              np.broadcast_to(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None], (size, size, 3)),
              rng.integers(0, 256, (size, size, 3)).astype(np.uint8)]
    encoded = [png_bytes(image) for image in images] + [png_bytes(rng.integers(0, 256, (size + 9, size + 4, 3)))]
    return {"serving_default": {"images": tf.constant(np.stack(images).astype(np.float32))},
            "predict_images": {"image_bytes": tf.constant(encoded)},
            "classify": {"inputs": tf.constant([image_example(data).SerializeToString() for data in encoded])}}


def _trunk_features(version_dir, trunk_signature: str, inputs) -> tf.Tensor:
    """The version's trunk on ``inputs``: its segments, each on the one before's features, as
    graft.contract says (or its whole trunk, for an export without segments)."""
    segments, _ = contract.shared_parts(version_dir)
    value = None
    for index, (_, path) in enumerate(segments):
        loaded = tf.saved_model.load(str(path))
        served = set(contract.read_signature_defs(path))
        if index == 0:
            assert served == set(contract.SHARED_SIGNATURES.values())
            outputs = loaded.signatures[trunk_signature](**inputs)
        else:
            assert served == {contract.SEGMENT_SIGNATURE}
            outputs = loaded.signatures[contract.SEGMENT_SIGNATURE](**{contract.FEATURES_KEY: value})
        assert set(outputs) == {contract.FEATURES_KEY}
        value = outputs[contract.FEATURES_KEY]
        assert value.dtype == tf.float32
    return value


def _assert_composes(version_dir, seed: int = 0, size: int = SIZE) -> None:
    """Every signature of the version equals its head on its trunk, within 1e-4, on varied inputs."""
    version, head = (tf.saved_model.load(str(path)) for path in (version_dir, contract.head_model_path(version_dir)))
    for name, inputs in _inputs(seed, size).items():
        whole = version.signatures[name](**inputs)
        features = _trunk_features(version_dir, contract.SHARED_SIGNATURES[name], inputs)
        parts = head.signatures[name](**{contract.FEATURES_KEY: features})
        assert set(parts) == set(whole), name
        for key, value in whole.items():
            if value.dtype == tf.string or value.dtype.is_integer:
                np.testing.assert_array_equal(parts[key].numpy(), value.numpy())
            else:
                np.testing.assert_allclose(parts[key].numpy(), value.numpy(), atol=1e-4)
        scores = whole["scores"].numpy()
        # Inputs that give one answer could hide a part that ignores them.
        assert np.ptp(scores, axis=0).max() > 1e-3, name


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    paths = {"a": export_shared_trunk_version(root, "a", trunk_seed=1, head_seed=10),
             "a4": export_shared_trunk_version(root, "a4", trunk_seed=1, head_seed=10, cut_layer="tiny_pool"),
             "whole": export_shared_trunk_version(root, "whole", trunk_seed=1, head_seed=10, segments=False),
             "b": export_shared_trunk_version(root, "b", trunk_seed=1, head_seed=20),
             "c": export_shared_trunk_version(root, "c", trunk_seed=2, head_seed=10)}
    return root, {name: Path(path) for name, path in paths.items()}


@pytest.mark.parametrize("name", ["a", "whole"])
def test_a_frozen_trunk_version_carries_both_parts_with_the_contract_signatures(shared_repo, name):
    _, paths = shared_repo
    version = paths[name]
    segments, head_path = contract.shared_parts(version)
    declared = contract.trunk_of(contract.read_lineage(version))
    assert head_path == contract.head_model_path(version)
    if name == "whole":   # exported as before segments: the trunk whole, its one segment
        assert segments == [(declared["fingerprint"], contract.trunk_model_path(version))]
    else:
        assert segments == [(s["fingerprint"], contract.segment_model_path(version, i))
                            for i, s in enumerate(declared["segments"])]
        assert len(segments) == 2 and not contract.trunk_model_path(version).exists()
    whole = contract.read_signature_defs(version)
    trunk = contract.read_signature_defs(segments[0][1])
    last = contract.read_signature_defs(segments[-1][1])
    head = contract.read_signature_defs(contract.head_model_path(version))
    assert set(trunk) == set(contract.SHARED_SIGNATURES.values())
    assert set(head) == set(export.SIGNATURE_METHODS)
    for name, trunk_name in contract.SHARED_SIGNATURES.items():
        # Same aliases, dtypes and shapes as the version's inputs; features out.
        assert {k: (v.dtype, v.tensor_shape) for k, v in trunk[trunk_name].inputs.items()} == \
               {k: (v.dtype, v.tensor_shape) for k, v in whole[name].inputs.items()}
        assert list(trunk[trunk_name].outputs) == [contract.FEATURES_KEY]
        assert trunk[trunk_name].method_name == contract.PREDICT_METHOD
        # The head takes the trunk's features and gives the version's outputs.
        assert list(head[name].inputs) == [contract.FEATURES_KEY]
        features = (last[contract.SEGMENT_SIGNATURE] if len(segments) > 1 else trunk[trunk_name]).outputs[
            contract.FEATURES_KEY]
        assert head[name].inputs[contract.FEATURES_KEY].dtype == features.dtype
        assert [d.size for d in head[name].inputs[contract.FEATURES_KEY].tensor_shape.dim] == \
               [d.size for d in features.tensor_shape.dim]
        assert {k: (v.dtype, v.tensor_shape) for k, v in head[name].outputs.items()} == \
               {k: (v.dtype, v.tensor_shape) for k, v in whole[name].outputs.items()}
        assert head[name].method_name == whole[name].method_name == export.SIGNATURE_METHODS[name]
    assert head["classify"].method_name == contract.CLASSIFY_METHOD


def test_every_signature_equals_its_head_on_its_trunk(shared_repo):
    _, paths = shared_repo
    _assert_composes(paths["a"], seed=3)
    _assert_composes(paths["c"], seed=4)


def test_heads_on_one_trunk_share_its_fingerprint_and_its_features(shared_repo):
    _, paths = shared_repo
    paths = {name: path for name, path in paths.items() if name in ("a", "b", "c")}
    declared = {name: contract.trunk_of(contract.read_lineage(path)) for name, path in paths.items()}
    assert declared["a"] == declared["b"] and declared["a"] != declared["c"]
    inputs = _inputs(5)["serving_default"]
    features = {name: _trunk_features(path, "images", inputs).numpy() for name, path in paths.items()}
    np.testing.assert_array_equal(features["a"], features["b"])
    assert not np.allclose(features["a"], features["c"])
    scores = {name: tf.saved_model.load(str(path)).signatures["serving_default"](**inputs)["scores"].numpy()
              for name, path in paths.items() if name != "c"}
    assert not np.allclose(scores["a"], scores["b"])  # different heads on the one trunk


def test_a_shallower_cut_shares_the_deeper_ones_first_segment(shared_repo):
    _, paths = shared_repo
    _assert_composes(paths["a4"], seed=6)
    whole, cut = (contract.trunk_of(contract.read_lineage(paths[name])) for name in ("a", "a4"))
    assert [s["cut_layer"] for s in whole["segments"]] == ["tiny_pool", None]
    assert cut["segments"] == [{"cut_layer": "tiny_pool", "fingerprint": cut["fingerprint"]}]
    assert whole["segments"][0] == cut["segments"][0]
    other = contract.trunk_of(contract.read_lineage(paths["c"]))
    assert other["segments"][0]["fingerprint"] != cut["fingerprint"]
    inputs = _inputs(7)["serving_default"]
    first = {name: tf.saved_model.load(str(contract.segment_model_path(paths[name], 0))).signatures["images"](
        **inputs)[contract.FEATURES_KEY].numpy() for name in ("a", "a4")}
    np.testing.assert_array_equal(first["a"], first["a4"])


def test_the_version_still_loads_standalone(shared_repo):
    _, paths = shared_repo
    servable = servable_module.Servable.load("a", 1, str(paths["a"]))
    try:
        images = _inputs(6)["serving_default"]["images"].numpy()
        out = servable.run("serving_default", {"images": images})
        expected = tf.saved_model.load(str(contract.head_model_path(paths["a"]))).signatures["serving_default"](
            features=_trunk_features(paths["a"], "images", {"images": tf.constant(images)}))["scores"].numpy()
        np.testing.assert_allclose(out["scores"], expected, atol=1e-4)
        assert servable.signatures["classify"].method_name == contract.CLASSIFY_METHOD
    finally:
        servable.unload()


def _tiny(seed: int = 0) -> tuple[keras.Model, keras.Model, keras.Model]:
    inputs = keras.Input((SIZE, SIZE, 3))
    trunk = keras.Model(inputs, keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.GlorotUniform(
        seed=seed))(inputs))
    features = keras.Input(tuple(trunk.output.shape[1:]))
    head = keras.Model(features, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(features)))
    return trunk, head, keras.Model(inputs, head(trunk(inputs)))


def test_the_split_goes_with_a_trunk_declaration_and_only_with_one(tmp_path):
    trunk, head, model = _tiny()
    declared = {"fingerprint": "0" * 64, "base": "tiny", "cut_layer": None, "input_shape": [SIZE, SIZE, 3]}
    with pytest.raises(ValueError, match="declares a trunk needs shared"):
        export.export_version(model, ["x", "y", "z"], tmp_path, "m", image_size=SIZE, lineage={"trunk": declared})
    with pytest.raises(ValueError, match="declares a trunk needs shared"):
        export.export_version(model, ["x", "y", "z"], tmp_path, "m", image_size=SIZE, lineage={},
                              shared=(trunk, head))
    assert not (tmp_path / "m").exists() or not [p for p in (tmp_path / "m").iterdir() if not p.name.startswith(".")]
    plain = Path(export.export_version(model, ["x", "y", "z"], tmp_path, "m", image_size=SIZE, lineage={}))
    assert not contract.trunk_model_path(plain).exists() and not contract.head_model_path(plain).exists()
    assert contract.shared_parts(plain) is None


@pytest.fixture(scope="module")
def fit_data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "data", per_class=8, seed=5)


def _fit(root: Path, data_dir: str, scenario: str, **changes) -> Path:
    config = pipeline.FitConfig(data=Path(data_dir), repo=root / "repo", model_name="shapes", base="vgg16",
                                weights="none", scenario=scenario, cut_layer="block2_pool", image_size=SIZE,
                                head_epochs=1, finetune_epochs=1, batch_size=8, run_dir=root / f"run-{scenario}",
                                **changes)
    return Path(pipeline.run(config))


def test_a_frozen_trunk_fit_exports_the_parts_and_a_fine_tuned_one_does_not(tmp_path, fit_data):
    frozen = _fit(tmp_path, fit_data, "1")
    assert contract.trunk_of(contract.read_lineage(frozen)) is not None
    assert contract.shared_parts(frozen) is not None
    _assert_composes(frozen, seed=7)
    tuned = _fit(tmp_path, fit_data, "2")
    assert contract.trunk_of(contract.read_lineage(tuned)) is None
    assert not contract.trunk_model_path(tuned).exists() and not contract.head_model_path(tuned).exists()


def test_publishing_an_export_directory_keeps_the_split(shared_repo):
    # promote publishes a candidate export directory by copying it: the copy must stay whole and split.
    root, paths = shared_repo
    version = repo.publish_export(root / "promoted", paths["b"])
    published = root / "promoted" / str(version)
    assert contract.shared_parts(published) is not None
    assert contract.read_lineage(published)["trunk"] == contract.read_lineage(paths["b"])["trunk"]
    _assert_composes(published, seed=8)


def test_a_mixed_precision_frozen_trunk_export_composes_too(tmp_path, fit_data):
    # The trunk computes in float16 there; its features leave the trunk SavedModel as float32.
    version = _fit(tmp_path, fit_data, "1", mixed_precision=True)
    assert contract.shared_parts(version) is not None
    _assert_composes(version, seed=9)
