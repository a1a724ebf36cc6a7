"""The trunk a frozen-trunk export declares (``graft.contract.TRUNK_KEYS``).

A version whose training never moved its trunk (scenarios 1 and 3, and any
plan whose phases all keep the trunk frozen) runs exactly the pretrained trunk
it was built on. Its fingerprint names that trunk: the base, the cut, the input
shape, the preprocessing, and the exact bytes of every trunk weight in layer
order. Two fits on different data with the same base, weights, cut and size get
the same fingerprint; a server may then run one trunk for both.

The declaration also lists the trunk's segments: the trunk cut at each block end
of its base before its own end, then itself, each fingerprinted as the trunk cut
there would be. A block4 cut and a block5 cut of the same weights then share the
fingerprints of segments 1 to 4, and a server may run those once for both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import keras
import numpy as np

from training.bases import Backbone, all_layers, truncate
from training.scenarios import FreezePlan


def fingerprint(backbone: Backbone, input_shape: Sequence[int]) -> str:
    """The sha256 hex digest that identifies ``backbone``'s trunk on inputs of ``input_shape`` (H, W, 3)."""
    return _digest(backbone, backbone.trunk, _cut_layer(backbone), input_shape)


def _digest(backbone: Backbone, trunk: keras.Model, cut_layer: str | None, input_shape: Sequence[int]) -> str:
    digest = hashlib.sha256()
    header = {"base": backbone.spec.name, "cut_layer": cut_layer,
              "input_shape": [int(v) for v in input_shape], "preprocess": backbone.spec.preprocess_mode}
    digest.update(json.dumps(header, sort_keys=True).encode())
    # Layer order and each weight's dtype, shape and bytes; not layer names, which Keras
    # numbers differently when the same trunk is built twice in one process.
    for layer in all_layers(trunk):
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
    own = fingerprint(backbone, input_shape)
    return {"fingerprint": own, "base": backbone.spec.name,
            "cut_layer": _cut_layer(backbone), "input_shape": [int(v) for v in input_shape],
            "segments": [{"cut_layer": cut, "fingerprint": _digest(backbone, truncate(backbone.trunk, cut), cut,
                                                                   input_shape)}
                         for cut in _inner_cuts(backbone)]
                        + [{"cut_layer": _cut_layer(backbone), "fingerprint": own}]}


def segments(backbone: Backbone) -> list[keras.Model]:
    """``backbone.model`` cut into the segments its declaration lists, shallowest first.

    The first maps raw 0..255 RGB (preprocessing included) to the features at the
    first cut; each later one maps the features before it to those at its own end.
    Chained, they compute ``backbone.model``; they share its layer objects.
    """
    trunk = backbone.trunk
    images = keras.Input(backbone.model.input.shape[1:], name="images")
    # backbone.model is images -> preprocessing -> trunk (training.bases.build_backbone).
    preprocess, = (layer for layer in backbone.model.layers
                   if layer is not trunk and not isinstance(layer, keras.layers.InputLayer))
    models, previous = [], None
    for cut in [*_inner_cuts(backbone), trunk.layers[-1].name]:
        if previous is None:
            models.append(keras.Model(images, truncate(trunk, cut)(preprocess(images)), name=f"segment_to_{cut}"))
        else:
            models.append(keras.Model(trunk.get_layer(previous).output, trunk.get_layer(cut).output,
                                      name=f"segment_{previous}_to_{cut}"))
        previous = cut
    return models


def _inner_cuts(backbone: Backbone) -> list[str]:
    # Block ends before the trunk's last layer, where nothing but the block end's own
    # output crosses into the rest: a segment boundary must carry the whole state.
    trunk = backbone.trunk
    order = {layer.name: index for index, layer in enumerate(trunk.layers)}
    last = len(trunk.layers) - 1
    return [cut for cut in backbone.spec.block_ends
            if cut in order and order[cut] < last and _separates(trunk, cut)]


def _separates(trunk: keras.Model, cut: str) -> bool:
    try:
        keras.Model(trunk.get_layer(cut).output, trunk.output)
    except ValueError:
        return False
    return True


def _cut_layer(backbone: Backbone) -> str | None:
    # A truncated trunk ends at its cut; a whole one has no cut.
    last = backbone.trunk.layers[-1].name
    return last if backbone.trunk.name.endswith(f"_to_{last}") else None
