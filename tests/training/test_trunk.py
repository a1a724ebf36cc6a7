"""training.trunk: the fingerprint names the trunk, not the data; only frozen trunks declare one."""

from __future__ import annotations

import pytest

from graft import contract
from training import trunk
import numpy as np

from training.bases import build_backbone, get_base
from training.scenarios import plan_for

VGG = get_base("vgg16")


@pytest.fixture(scope="module")
def hed_block4():
    return build_backbone(VGG, 32, "hed", cut_layer="block4_pool")


def test_the_same_trunk_built_twice_has_one_fingerprint(hed_block4):
    again = build_backbone(VGG, 32, "hed", cut_layer="block4_pool")
    assert trunk.fingerprint(hed_block4, (32, 32, 3)) == trunk.fingerprint(again, (32, 32, 3))


def test_cut_size_and_weights_each_change_the_fingerprint(hed_block4):
    reference = trunk.fingerprint(hed_block4, (32, 32, 3))
    shallower = build_backbone(VGG, 32, "hed", cut_layer="block3_pool")
    random = build_backbone(VGG, 32, "none", cut_layer="block4_pool")
    assert trunk.fingerprint(shallower, (32, 32, 3)) != reference
    assert trunk.fingerprint(hed_block4, (48, 48, 3)) != reference
    assert trunk.fingerprint(random, (32, 32, 3)) != reference


def test_only_plans_that_keep_the_trunk_frozen_declare_it(hed_block4):
    feature_extraction = plan_for(3, VGG, cut_layer="block4_pool")
    fine_tune = plan_for(2, VGG)
    assert trunk.keeps_trunk_frozen(feature_extraction) and not trunk.keeps_trunk_frozen(fine_tune)
    declared = trunk.declaration(hed_block4, feature_extraction, (32, 32, 3))
    segments = declared.pop("segments")
    assert declared == {"fingerprint": trunk.fingerprint(hed_block4, (32, 32, 3)), "base": "vgg16",
                        "cut_layer": "block4_pool", "input_shape": [32, 32, 3]}
    assert [s["cut_layer"] for s in segments] == ["block1_pool", "block2_pool", "block3_pool", "block4_pool"]
    assert segments[-1]["fingerprint"] == declared["fingerprint"]
    declared["segments"] = segments
    # What the contract's schema accepts, and reads back.
    assert contract.trunk_of(contract.new_lineage(trunk=declared)) == declared
    assert trunk.declaration(hed_block4, fine_tune, (32, 32, 3)) is None


def test_each_segment_is_fingerprinted_as_the_trunk_cut_there_would_be(hed_block4):
    plan = plan_for(3, VGG, cut_layer="block4_pool")
    segments = trunk.declaration(hed_block4, plan, (32, 32, 3))["segments"]
    for segment in segments[:-1]:
        cut_there = build_backbone(VGG, 32, "hed", cut_layer=segment["cut_layer"])
        assert segment["fingerprint"] == trunk.fingerprint(cut_there, (32, 32, 3))
    # A deeper cut of the same weights shares every segment of the shallower one.
    whole = build_backbone(VGG, 32, "hed")
    deeper = trunk.declaration(whole, plan_for(1, VGG), (32, 32, 3))["segments"]
    assert [s["fingerprint"] for s in deeper[:4]] == [s["fingerprint"] for s in segments]
    assert deeper[4] == {"cut_layer": None, "fingerprint": trunk.fingerprint(whole, (32, 32, 3))}
    # Other weights share none.
    random = build_backbone(VGG, 32, "none", cut_layer="block4_pool")
    others = trunk.declaration(random, plan, (32, 32, 3))["segments"]
    assert not {s["fingerprint"] for s in others} & {s["fingerprint"] for s in segments}


@pytest.mark.parametrize("base, cut", [("vgg16", "block4_pool"), ("mobilenet_v2", None)])
def test_the_segments_chained_compute_the_trunk(base, cut):
    backbone = build_backbone(get_base(base), 32, "none", cut_layer=cut)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    features = images
    models = trunk.segments(backbone)
    for model in models:
        features = model(features)
    assert len(models) == len(trunk.declaration(backbone, plan_for(1, backbone.spec), (32, 32, 3))["segments"])
    # VGG16 to block4: four pools. MobileNetV2's block ends are residual adds that nothing
    # else crosses, so each of its four ends a segment.
    assert len(models) == 4
    np.testing.assert_allclose(np.asarray(features), np.asarray(backbone.model(images)), rtol=0, atol=1e-5)
