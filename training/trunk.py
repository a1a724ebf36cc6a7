"""The trunk a frozen-trunk export declares (``graft.contract.TRUNK_KEYS``).

A version whose training never moved its trunk (scenarios 1 and 3, and any
plan whose phases all keep the trunk frozen) runs exactly the pretrained trunk
it was built on. Its fingerprint names that trunk: the base, the cut, the input
shape, the preprocessing, and the exact bytes of every trunk weight in layer
order. Two fits on different data with the same base, weights, cut and size get
the same fingerprint; a server may then run one trunk for both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from training.bases import Backbone, all_layers
from training.scenarios import FreezePlan


def fingerprint(backbone: Backbone, input_shape: Sequence[int]) -> str:
    """The sha256 hex digest that identifies ``backbone``'s trunk on inputs of ``input_shape`` (H, W, 3)."""
    digest = hashlib.sha256()
    header = {"base": backbone.spec.name, "cut_layer": _cut_layer(backbone),
              "input_shape": [int(v) for v in input_shape], "preprocess": backbone.spec.preprocess_mode}
    digest.update(json.dumps(header, sort_keys=True).encode())
    # Layer order and each weight's dtype, shape and bytes; not layer names, which Keras
    # numbers differently when the same trunk is built twice in one process.
    for layer in all_layers(backbone.trunk):
        for weight in layer.weights:
            value = np.ascontiguousarray(np.asarray(weight))
            digest.update(f"{type(layer).__name__}|{value.dtype.str}|{value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def keeps_trunk_frozen(plan: FreezePlan) -> bool:
    """Whether no phase of ``plan`` trains the trunk, so the export runs the pretrained trunk as is."""
    return not any(phase.train_trunk for phase in plan.phases)


def declaration(backbone: Backbone, plan: FreezePlan, input_shape: Sequence[int]) -> dict | None:
    """The lineage's ``trunk`` entry for an export of ``plan`` on ``backbone``; None when the trunk trained."""
    if not keeps_trunk_frozen(plan):
        return None
    return {"fingerprint": fingerprint(backbone, input_shape), "base": backbone.spec.name,
            "cut_layer": _cut_layer(backbone), "input_shape": [int(v) for v in input_shape]}


def _cut_layer(backbone: Backbone) -> str | None:
    # A truncated trunk ends at its cut; a whole one has no cut.
    last = backbone.trunk.layers[-1].name
    return last if backbone.trunk.name.endswith(f"_to_{last}") else None
