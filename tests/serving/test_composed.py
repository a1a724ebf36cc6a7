"""``Servable.then`` and ``chain``: a trunk's signature and a head's (or a trunk's segments), traced as
one call, answer as the calls in turn."""

from __future__ import annotations

import numpy as np
import pytest

from graft import contract
from serving.errors import InvalidArgument
from serving.servable import Servable
from tests.models import export_shared_trunk_version, image_example, png_bytes

SIZE = 32


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    # The same trunk exported whole and cut into its segments.
    root = tmp_path_factory.mktemp("composed")
    whole = export_shared_trunk_version(root, "whole", trunk_seed=3, head_seed=4, size=SIZE, segments=False)
    cut = export_shared_trunk_version(root, "cut", trunk_seed=3, head_seed=4, size=SIZE)
    (whole_segments, head_path), (cut_segments, _) = contract.shared_parts(whole), contract.shared_parts(cut)
    (_, trunk_path), = whole_segments
    return str(trunk_path), str(head_path), [str(path) for _, path in cut_segments]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


def _in_turn(trunk: Servable, head: Servable, signature: str, inputs: dict) -> dict:
    features = trunk.run(contract.SHARED_SIGNATURES[signature], inputs)[contract.FEATURES_KEY]
    return head.run(signature, {contract.FEATURES_KEY: features})


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "unfrozen"])
def test_every_shared_signature_composes_to_the_same_answers(parts, freeze):
    trunk = Servable.load("trunk", 0, parts[0], freeze=freeze)
    head = Servable.load("head", 1, parts[1], freeze=freeze)
    images = _images(3, seed=1)
    inputs = {
        "serving_default": {"images": images},
        "predict_images": {"image_bytes": np.array([png_bytes(i) for i in images], dtype=object)},
        "classify": {"inputs": np.array([image_example(png_bytes(i)).SerializeToString() for i in images],
                                          dtype=object)},
    }
    for signature, given in inputs.items():
        composed = trunk.then(contract.SHARED_SIGNATURES[signature], head, signature, contract.FEATURES_KEY)
        assert composed is not None, signature
        want, got = _in_turn(trunk, head, signature, given), composed(given)
        assert set(got) == set(want)
        for key, value in want.items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(got[key], value, atol=1e-5)
            else:
                np.testing.assert_array_equal(got[key], value)
    assert len({float(s) for s in got["scores"][:, 0]}) == 3  # the answers vary with the image


def test_a_composed_call_maps_errors_as_run_does(parts):
    trunk, head = Servable.load("trunk", 0, parts[0]), Servable.load("head", 1, parts[1])
    composed = trunk.then("image_bytes", head, "predict_images", contract.FEATURES_KEY)
    with pytest.raises(InvalidArgument):
        composed({"image_bytes": np.array([b"not an image"], dtype=object)})
    with pytest.raises(InvalidArgument, match="missing input"):
        composed({})
    with pytest.raises(InvalidArgument, match="has no input 'pixels'"):
        composed({"pixels": _images(1, seed=2)})
    # A good request after the bad ones still answers.
    assert composed({"image_bytes": np.array([png_bytes(_images(1, seed=3)[0])], dtype=object)})["scores"].shape[0] == 1


def test_nothing_composes_across_unknown_signatures_or_several_replicas(parts):
    trunk, head = Servable.load("trunk", 0, parts[0]), Servable.load("head", 1, parts[1])
    assert trunk.then("images", head, "no_such_signature", contract.FEATURES_KEY) is None
    assert trunk.then("no_such_signature", head, "serving_default", contract.FEATURES_KEY) is None
    doubled = Servable.load("trunk", 0, parts[0], device=["/cpu:0", "/cpu:0"])
    assert doubled.then("images", head, "serving_default", contract.FEATURES_KEY) is None


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "unfrozen"])
def test_a_chain_of_segments_and_head_answers_as_the_whole_trunk_then_the_head(parts, freeze):
    trunk = Servable.load("trunk", 0, parts[0], freeze=freeze)
    head = Servable.load("head", 1, parts[1], freeze=freeze)
    first, *rest = (Servable.load(f"segment-{i}", 0, path, freeze=freeze) for i, path in enumerate(parts[2]))
    assert rest, "the tiny trunk has two segments"
    steps = [(segment, contract.SEGMENT_SIGNATURE) for segment in rest]
    images = {"images": _images(4, seed=5)}
    features = first.chain("images", steps, contract.FEATURES_KEY)(images)[contract.FEATURES_KEY]
    np.testing.assert_allclose(features, trunk.run("images", images)[contract.FEATURES_KEY], atol=1e-5)
    scores = first.chain("images", [*steps, (head, "serving_default")], contract.FEATURES_KEY)(images)["scores"]
    np.testing.assert_allclose(scores, _in_turn(trunk, head, "serving_default", images)["scores"], atol=1e-5)
    assert first.chain("images", [*steps, (head, "no_such_signature")], contract.FEATURES_KEY) is None
