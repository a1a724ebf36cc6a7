"""Freeze plans of the four scenarios and the `auto` decision (pure Python)."""

import subprocess
import sys

import pytest

from graft import contract
from training.scenarios import (
    HEAD_LEARNING_RATES, SCENARIO_ALIASES, AutoDecision, FreezePlan, Phase, decide_auto, decision_record, default_cut,
    parse_scenario, plan_for,
)


class Spec:
    """The two attributes plans read from a training.bases.BaseSpec (VGG16's values)."""

    name = "vgg16"
    block_ends = ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool")


VGG = Spec()
LAYERS = ["input_layer", "block1_conv1", "block1_conv2", "block1_pool", "block2_conv1", "block2_conv2",
          "block2_pool"]


def test_scenarios_module_imports_without_tensorflow():
    code = ("import sys, training.scenarios; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("text, expected", [
    ("1", 1), ("feature-extraction", 1), ("2", 2), ("fine-tune", 2), ("3", 3), ("early-features", 3),
    ("4", 4), ("full", 4), ("auto", "auto"), (" Full ", 4), (3, 3), ("AUTO", "auto")])
def test_parse_scenario(text, expected):
    assert parse_scenario(text) == expected


def test_parse_scenario_rejects_unknown_and_lists_choices():
    with pytest.raises(ValueError, match="early-features"):
        parse_scenario("5")
    assert set(SCENARIO_ALIASES.values()) == {1, 2, 3, 4}


def test_scenario_1_trains_only_the_head_on_cached_features():
    plan = plan_for(1, VGG, head_epochs=7, finetune_epochs=3)
    assert plan.scenario == 1 and plan.name == "feature-extraction"
    assert plan.cut_layer is None and plan.cache_features and plan.bn_frozen
    assert plan.phases == (Phase("head", False, 7, "adam", 1e-3),)
    assert plan.trainable_trunk_layers(LAYERS, plan.phases[0]) == []
    assert plan.frozen_trunk_layers(LAYERS, plan.phases[0]) == LAYERS


def test_scenario_2_fine_tunes_after_the_head_keeping_the_first_layers():
    plan = plan_for(2, VGG, freeze_first=5, head_epochs=4, finetune_epochs=6)
    head, tune = plan.phases
    assert head == Phase("head", False, 4, "adam", 1e-3)
    assert tune == Phase("fine-tune", True, 6, "sgd", 1e-4, momentum=0.9)  # the article's SGD
    assert plan.trainable_trunk_layers(LAYERS, head) == []
    assert plan.trainable_trunk_layers(LAYERS, tune) == LAYERS[5:]
    assert plan.frozen_trunk_layers(LAYERS, tune) == LAYERS[:5]
    adam = plan_for(2, VGG, finetune_optimizer="adam", finetune_lr=5e-5)
    assert adam.phases[1].optimizer == "adam" and adam.phases[1].momentum == 0.0
    assert adam.phases[1].learning_rate == 5e-5


def test_scenario_3_cuts_early_and_freezes():
    plan = plan_for(3, VGG)
    assert plan.cut_layer == "block4_pool" == default_cut(VGG)
    assert len(plan.phases) == 1 and not plan.phases[0].train_trunk and plan.cache_features
    chosen = plan_for(3, VGG, cut_layer="block2_pool", evidence={"best_block": "block2_pool"})
    assert chosen.cut_layer == "block2_pool" and chosen.evidence["best_block"] == "block2_pool"


def test_scenario_4_trains_everything_after_the_head():
    plan = plan_for(4, VGG, head="seed")
    assert plan.head == "seed" and plan.name == "full"
    assert [phase.train_trunk for phase in plan.phases] == [False, True]
    assert plan.phases[1].optimizer == "sgd" and plan.phases[1].momentum == 0.9
    assert plan.trainable_trunk_layers(LAYERS, plan.phases[1]) == LAYERS
    with pytest.raises(ValueError, match="scenario 4"):
        plan_for(4, VGG, freeze_first=5)


def test_plan_rejects_bad_options():
    for kwargs in ({"head": "mlp"}, {"finetune_optimizer": "rmsprop"}, {"head_epochs": 0},
                   {"freeze_first": -1}, {"head_lr": 0.0}):
        with pytest.raises(ValueError):
            plan_for(2, VGG, **kwargs)
    with pytest.raises(ValueError, match="finetune_epochs"):
        plan_for(4, VGG, finetune_epochs=0)
    with pytest.raises(ValueError):
        plan_for(5, VGG)
    plan = plan_for(1, VGG)
    with pytest.raises(ValueError, match="not part"):
        plan.trainable_trunk_layers(LAYERS, Phase("other", True, 1, "sgd", 0.1))


def test_plan_describes_itself_as_json_data():
    described = plan_for(2, VGG, freeze_first=5, evidence={"size": "large"}).describe()
    assert described["phases"][1]["optimizer"] == "sgd" and described["evidence"] == {"size": "large"}
    assert isinstance(plan_for(1, VGG), FreezePlan)


ENDS = VGG.block_ends


@pytest.mark.parametrize("per_class, scores, expected", [
    ({"a": 20, "b": 30}, {"block3_pool": 0.6, "block5_pool": 0.9}, (1, None, "small", "similar")),
    ({"a": 500, "b": 400}, {"block3_pool": 0.6, "block5_pool": 0.9}, (2, None, "large", "similar")),
    ({"a": 20, "b": 30}, {"block3_pool": 0.95, "block4_pool": 0.97, "block5_pool": 0.8},
     (3, "block4_pool", "small", "different")),
    ({"a": 500, "b": 400}, {"block4_pool": 0.97, "block5_pool": 0.8}, (4, None, "large", "different")),
])
def test_decide_auto_quadrants(per_class, scores, expected):
    decision = decide_auto(per_class, scores, ENDS)
    assert isinstance(decision, AutoDecision)
    assert (decision.scenario, decision.cut_layer, decision.size, decision.similarity) == expected
    assert decision.evidence["probe_scores"] == scores
    assert decision.evidence["scenario"] == expected[0]


def test_decide_auto_threshold_is_overridable_and_uses_the_median():
    counts = {"a": 10, "b": 60, "c": 70}  # median 60
    scores = {"block5_pool": 0.9}
    assert decide_auto(counts, scores, ENDS).size == "small"
    assert decide_auto(counts, scores, ENDS, small_threshold=60).size == "large"
    assert decide_auto(counts, scores, ENDS).evidence["median_images_per_class"] == 60


def test_decide_auto_ties_and_margin_favour_the_last_block():
    tie = {"block4_pool": 0.9, "block5_pool": 0.9}
    assert decide_auto({"a": 5, "b": 5}, tie, ENDS).similarity == "similar"
    near = {"block4_pool": 0.91, "block5_pool": 0.9}
    assert decide_auto({"a": 5, "b": 5}, near, ENDS).cut_layer == "block4_pool"
    assert decide_auto({"a": 5, "b": 5}, near, ENDS, margin=0.05).scenario == 1


def test_decide_auto_rejects_incomplete_evidence():
    with pytest.raises(ValueError, match="last block"):
        decide_auto({"a": 5, "b": 5}, {"block4_pool": 0.9}, ENDS)
    with pytest.raises(ValueError, match="not block ends"):
        decide_auto({"a": 5, "b": 5}, {"conv9": 0.9, "block5_pool": 0.5}, ENDS)
    with pytest.raises(ValueError):
        decide_auto({}, {"block5_pool": 0.5}, ENDS)


def test_the_decision_record_holds_autos_evidence_in_the_contracts_schema():
    decision = decide_auto({"a": 10, "b": 12}, {"block4_pool": 0.95, "block5_pool": 0.8}, ENDS)
    evidence = {"chosen_by": "auto", **decision.evidence, "probes": {"block4_pool": {"accuracy": 0.95}}}
    plan = plan_for(decision.scenario, VGG, cut_layer=decision.cut_layer, evidence=evidence)
    record = decision_record(plan)
    assert record["chosen_by"] == "auto" and record["scenario"] == 3 and record["cut_layer"] == "block4_pool"
    assert record["probe_accuracy"] == {"block4_pool": 0.95, "block5_pool": 0.8}
    assert record["images_per_class"] == 11 and record["small_threshold"] == 100
    assert record["probes"] == {"block4_pool": {"accuracy": 0.95}}
    assert contract.new_lineage(decision=record)["decision"] == record
    user = decision_record(plan_for(1, VGG, evidence={"chosen_by": "user", "flag": "1"}))
    assert user == {"chosen_by": "user", "scenario": 1, "cut_layer": None}
    assert contract.new_lineage(decision=user)


def test_each_head_has_its_own_default_learning_rate():
    assert plan_for(1, VGG).phases[0].learning_rate == HEAD_LEARNING_RATES["gap"] == 1e-3
    assert plan_for(1, VGG, head="seed").phases[0].learning_rate == HEAD_LEARNING_RATES["seed"] == 1e-4
    assert plan_for(1, VGG, head="seed", head_lr=0.01).phases[0].learning_rate == 0.01
