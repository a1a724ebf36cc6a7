"""The four transfer-learning scenarios as data: freeze plans and the `auto` decision.

CS231n's rule, as the Keras "migration learning" article applies it:

==========  ==============  =====================================================
scenario    data            what trains
==========  ==============  =====================================================
1           small, similar  a head on the frozen trunk (feature extraction)
2           large, similar  the head, then the whole trunk except its first N layers
3           small, different a head on a frozen trunk cut at an earlier block
4           large, different the head, then every layer from the pretrained start
==========  ==============  =====================================================

Pure Python on purpose: the plan is decided and unit-tested without TensorFlow.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol

SCENARIO_ALIASES: Mapping[str, int] = MappingProxyType({
    "1": 1, "feature-extraction": 1,
    "2": 2, "fine-tune": 2,
    "3": 3, "early-features": 3,
    "4": 4, "full": 4,
})
SCENARIO_NAMES: Mapping[int, str] = MappingProxyType({
    1: "feature-extraction", 2: "fine-tune", 3: "early-features", 4: "full",
})
HEADS = ("gap", "seed")
OPTIMIZERS = ("adam", "sgd")

# Images per class below which a data set counts as "small" (CS231n gives no
# number; a hundred per class is where fine-tuning a whole VGG stops
# overfitting quickly in the article's setting). Overridable per call / flag.
SMALL_THRESHOLD = 100
# The article's fine-tuning optimizer: SGD(1e-4, momentum 0.9).
FINETUNE_MOMENTUM = 0.9
# The head phase's Adam learning rate when none is given, per head: the seed head's
# eight million weights drift away from their probe start at the gap head's rate
# (docs/benchmarks.md, bench/transfer.py's section).
HEAD_LEARNING_RATES: Mapping[str, float] = MappingProxyType({"gap": 1e-3, "seed": 1e-4})


class _Spec(Protocol):
    """What plans need from a backbone spec (training.bases.BaseSpec has it)."""

    name: str
    block_ends: tuple[str, ...]


def parse_scenario(text: str | int) -> int | Literal["auto"]:
    """Turn a scenario flag value (number, alias or "auto") into 1..4 or "auto"."""
    key = str(text).strip().lower()
    if key == "auto":
        return "auto"
    if key in SCENARIO_ALIASES:
        return SCENARIO_ALIASES[key]
    choices = ", ".join(["auto", *SCENARIO_ALIASES])
    raise ValueError(f"unknown scenario {text!r}; choose one of: {choices}")


@dataclass(frozen=True)
class Phase:
    """One training phase: which part trains, for how long, with which optimizer."""

    name: str
    train_trunk: bool
    epochs: int
    optimizer: str  # "adam" | "sgd"
    learning_rate: float
    momentum: float = 0.0


@dataclass(frozen=True)
class FreezePlan:
    """What a scenario freezes, where it cuts, and the phases it trains in order.

    `freeze_first` counts entries of `trunk.layers` as Keras lists them, the
    InputLayer included, like the article's `model.layers[:5]`.
    `cache_features`: phases that keep the trunk frozen train the head on trunk
    features computed once. `bn_frozen`: BatchNormalization layers never train.
    """

    scenario: int
    name: str
    cut_layer: str | None
    freeze_first: int
    head: str  # "gap" | "seed"
    phases: tuple[Phase, ...]
    bn_frozen: bool = True
    cache_features: bool = True
    evidence: Mapping = field(default_factory=dict)

    def trainable_trunk_layers(self, layer_names: Sequence[str], phase: Phase) -> list[str]:
        """Names of trunk layers that train during `phase` (BN exclusion is bases.set_trunk_trainable's job)."""
        if phase not in self.phases:
            raise ValueError(f"phase {phase.name!r} is not part of this plan")
        if not phase.train_trunk:
            return []
        return list(layer_names[self.freeze_first:])

    def frozen_trunk_layers(self, layer_names: Sequence[str], phase: Phase) -> list[str]:
        """Names of trunk layers kept frozen during `phase` (the complement of trainable_trunk_layers)."""
        trainable = set(self.trainable_trunk_layers(layer_names, phase))
        return [name for name in layer_names if name not in trainable]

    def describe(self) -> dict:
        """A JSON-ready summary for lineage and the printed decisions."""
        return {
            "scenario": self.scenario, "name": self.name, "cut_layer": self.cut_layer,
            "freeze_first": self.freeze_first, "head": self.head, "bn_frozen": self.bn_frozen,
            "cache_features": self.cache_features,
            "phases": [vars(phase).copy() for phase in self.phases],
            "evidence": dict(self.evidence),
        }


def default_cut(spec: _Spec) -> str:
    """Scenario 3's cut when neither the user nor `auto` chose one: the end of the penultimate stage.

    For VGG16/VGG19 that is block4_pool, which beat block5_pool in the linear
    probes measured on data unlike the source task (docs/benchmarks.md).
    """
    if len(spec.block_ends) < 2:
        raise ValueError(f"base {spec.name!r} lists fewer than two block ends; pass a cut layer")
    return spec.block_ends[-2]


def plan_for(scenario: int, spec: _Spec, *, cut_layer: str | None = None, freeze_first: int = 0,
             head: str = "gap", head_epochs: int = 100, finetune_epochs: int = 10,
             head_lr: float | None = None, finetune_lr: float = 1e-4, finetune_optimizer: str = "sgd",
             momentum: float = FINETUNE_MOMENTUM, evidence: Mapping | None = None) -> FreezePlan:
    """Build the freeze plan of one scenario for one base.

    Every plan starts with a head phase (Adam at `head_lr`, trunk frozen;
    None means the head's own rate, HEAD_LEARNING_RATES).
    Scenarios 2 and 4 add a fine-tuning phase (`finetune_optimizer` at
    `finetune_lr`, SGD with momentum 0.9 by default, as the article).
    Scenario 3 cuts at `cut_layer`, else `default_cut(spec)`. `freeze_first`
    matters in scenario 2, has no effect in 1 and 3 (the trunk never trains)
    and is an error in 4.
    """
    if scenario not in SCENARIO_NAMES:
        raise ValueError(f"scenario must be 1, 2, 3 or 4, not {scenario!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if head_lr is None:
        head_lr = HEAD_LEARNING_RATES[head]
    if finetune_optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {finetune_optimizer!r}")
    if head_epochs < 1:
        raise ValueError(f"head_epochs must be at least 1, not {head_epochs}")
    if scenario in (2, 4) and finetune_epochs < 1:
        raise ValueError(f"finetune_epochs must be at least 1 for scenario {scenario}, not {finetune_epochs}")
    if freeze_first < 0:
        raise ValueError(f"freeze_first must be >= 0, not {freeze_first}")
    if freeze_first and scenario == 4:
        raise ValueError("freeze_first contradicts scenario 4 (full), which trains every layer; "
                         "use scenario 2 (fine-tune) to keep the first layers frozen")
    if not head_lr > 0 or not finetune_lr > 0:
        raise ValueError("learning rates must be positive")

    phases = [Phase("head", train_trunk=False, epochs=head_epochs, optimizer="adam", learning_rate=head_lr)]
    if scenario in (2, 4):
        phases.append(Phase(
            "fine-tune" if scenario == 2 else "full", train_trunk=True, epochs=finetune_epochs,
            optimizer=finetune_optimizer, learning_rate=finetune_lr,
            momentum=momentum if finetune_optimizer == "sgd" else 0.0))
    if scenario == 3 and cut_layer is None:
        cut_layer = default_cut(spec)
    return FreezePlan(
        scenario=scenario, name=SCENARIO_NAMES[scenario], cut_layer=cut_layer,
        freeze_first=freeze_first, head=head, phases=tuple(phases), bn_frozen=True,
        cache_features=True, evidence=MappingProxyType(dict(evidence or {})))


@dataclass(frozen=True)
class AutoDecision:
    """What `auto` chose and why (the evidence goes into the lineage)."""

    scenario: int
    cut_layer: str | None
    size: str        # "small" | "large"
    similarity: str  # "similar" | "different"
    evidence: dict


def decide_auto(per_class_counts: Mapping[str, int], probe_scores: Mapping[str, float],
                block_ends: Sequence[str], *, small_threshold: int = SMALL_THRESHOLD,
                margin: float = 0.0) -> AutoDecision:
    """Pick the scenario from the data: size from images per class, similarity from linear probes.

    "small" when the median images per class is below `small_threshold`.
    "different" when the best probe (the deepest one among ties) is not at the
    last block end and beats the last block's accuracy by more than `margin`;
    the cut then goes to that block (scenario 3; scenario 4 fine-tunes all).
    `probe_scores` are accuracies per block end; the pipeline passes
    training.probe.BlockScore.accuracy (validation and leave-one-out training
    predictions pooled), which ranks blocks more reliably than validation alone.
    """
    if not per_class_counts:
        raise ValueError("per_class_counts is empty")
    if not block_ends:
        raise ValueError("block_ends is empty")
    last = block_ends[-1]
    probed = [name for name in block_ends if name in probe_scores]
    if last not in probe_scores:
        raise ValueError(f"no probe score for the last block end {last!r}")
    unknown = sorted(set(probe_scores) - set(block_ends))
    if unknown:
        raise ValueError(f"probe scores for layers that are not block ends: {', '.join(unknown)}")

    median = statistics.median(per_class_counts.values())
    size = "small" if median < small_threshold else "large"
    # Ties go to the deeper block: cutting earlier must be earned.
    best = max(reversed(probed), key=lambda name: probe_scores[name])
    different = best != last and probe_scores[best] - probe_scores[last] > margin
    similarity = "different" if different else "similar"
    scenario = {("small", "similar"): 1, ("large", "similar"): 2,
                ("small", "different"): 3, ("large", "different"): 4}[size, similarity]
    cut_layer = best if scenario == 3 else None
    evidence = {
        "rule": "CS231n: small/large from median images per class vs threshold; "
                "different when the best linear probe (by probe_scores) is not at the last block",
        "per_class_counts": dict(per_class_counts),
        "median_images_per_class": median,
        "small_threshold": small_threshold,
        "size": size,
        "probe_scores": {name: float(probe_scores[name]) for name in probed},
        "best_block": best,
        "last_block": last,
        "margin": margin,
        "similarity": similarity,
        "scenario": scenario,
        "cut_layer": cut_layer,
    }
    return AutoDecision(scenario, cut_layer, size, similarity, evidence)


def decision_record(plan: FreezePlan) -> dict:
    """The lineage's ``decision`` (graft.contract's schema): who chose the plan, and ``auto``'s evidence.

    For ``auto``: the probe accuracy at each cut (and its parts, when the plan
    has them), the data size (median images per class, counts per class) and
    the small/large threshold, next to what was chosen.
    """
    evidence = plan.evidence
    record = {"chosen_by": "auto" if evidence.get("chosen_by") == "auto" else "user",
              "scenario": plan.scenario, "cut_layer": plan.cut_layer}
    if record["chosen_by"] == "user":
        return record
    record.update({
        "rule": evidence["rule"],
        "probe_accuracy": dict(evidence["probe_scores"]),
        "probes": dict(evidence.get("probes", {})),
        "images_per_class": evidence["median_images_per_class"],
        "per_class_counts": dict(evidence["per_class_counts"]),
        "small_threshold": evidence["small_threshold"],
        "size": evidence["size"],
        "similarity": evidence["similarity"],
        "best_block": evidence["best_block"],
        "auto_cut_layer": evidence["cut_layer"],
    })
    return record
