"""training.phases: the rules both training loops share (assembly, cached phases, trainable layers, checks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from training import bases, phases, scenarios

SIZE = 32


@pytest.fixture(scope="module")
def backbone():
    return bases.build_backbone(bases.get_base("vgg16"), SIZE, "none", cut_layer="block2_pool")


def test_assemble_puts_the_head_on_the_backbone_with_the_same_layers(backbone):
    plan = scenarios.plan_for(2, backbone.spec, cut_layer="block2_pool", head_epochs=1, finetune_epochs=1)
    options = phases.FitOptions(image_size=SIZE, seed=0)
    head, full = phases.assemble(plan, backbone, 3, options, tf.distribute.get_strategy())
    assert tuple(full.input.shape) == (None, SIZE, SIZE, 3) and tuple(full.output.shape) == (None, 3)
    assert head in full.layers and backbone.model in full.layers
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(full(images, training=False),
                               head(backbone.model(images, training=False), training=False), atol=1e-5)


def test_only_phases_with_a_frozen_trunk_use_cached_features(backbone):
    plan = scenarios.plan_for(2, backbone.spec, cut_layer="block2_pool", head_epochs=1, finetune_epochs=1)
    head_phase, finetune = plan.phases
    options = phases.FitOptions(image_size=SIZE)
    assert phases.uses_cached_features(plan, options, head_phase)
    assert not phases.uses_cached_features(plan, options, finetune)
    forced = dataclasses.replace(options, cache_features=False)
    assert not phases.uses_cached_features(plan, forced, head_phase)


def test_phase_trainable_layers_and_the_frozen_rest(backbone):
    plan = scenarios.plan_for(2, backbone.spec, cut_layer="block2_pool", freeze_first=3,
                              head_epochs=1, finetune_epochs=1)
    head_phase, finetune = plan.phases
    assert phases.set_phase_trainable(plan, backbone, head_phase) == []
    trainable = phases.set_phase_trainable(plan, backbone, finetune)
    assert trainable == ["block2_conv1", "block2_conv2"]
    assert phases.frozen_trunk_layers(backbone, trainable) == ["block1_conv1", "block1_conv2"]
    assert phases.phase_title(1, plan, finetune, False, trainable) == "phase 2/2 fine-tune: 2 trunk layers + head"
    assert phases.phase_title(0, plan, head_phase, True, []) == "phase 1/2 head: head on cached features"


def test_runs_no_loop_can_do_are_refused_before_any_work(backbone, monkeypatch):
    plan = scenarios.plan_for(1, backbone.spec, head_epochs=1)
    with pytest.raises(ValueError, match="augment_copies"):
        phases.check_run(plan, phases.FitOptions(image_size=SIZE, augment_copies=-1))
    with pytest.raises(ValueError, match="no phases"):
        phases.check_run(dataclasses.replace(plan, phases=()), phases.FitOptions(image_size=SIZE))
    monkeypatch.setattr(phases, "tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match="pip install tensorboard"):
        phases.check_run(plan, phases.FitOptions(image_size=SIZE, log_dir="tb"))
    phases.check_run(plan, phases.FitOptions(image_size=SIZE))
