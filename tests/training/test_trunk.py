"""training.trunk: the fingerprint names the trunk, not the data; only frozen trunks declare one."""

from __future__ import annotations

import pytest

from graft import contract
from training import trunk
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
    assert declared == {"fingerprint": trunk.fingerprint(hed_block4, (32, 32, 3)), "base": "vgg16",
                        "cut_layer": "block4_pool", "input_shape": [32, 32, 3]}
    # What the contract's schema accepts, and reads back.
    assert contract.trunk_of(contract.new_lineage(trunk=declared)) == declared
    assert trunk.declaration(hed_block4, fine_tune, (32, 32, 3)) is None
