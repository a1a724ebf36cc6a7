"""Backbone registry: keras.applications trunks with their preprocessing built into the model.

A backbone takes raw 0..255 RGB (what exported models accept) and applies
its base's preprocess_input inside the graph, then the notop trunk, possibly
cut at a block end. Weights come from training.weights, never from a download.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import keras
import numpy as np

# BASES and get_base are the catalog's; callers keep asking bases for them.
from training.catalog import BASES, BaseSpec, get_base  # noqa: F401
from training.data import image_hw
from training.errors import UsageError
from training.preprocess import TORCH_STD, Preprocess
from training.sources import WeightsSource, resolve_weights
from training.weights import WeightsReport, apply_weights


def application(spec: BaseSpec) -> Callable[..., keras.Model]:
    """The keras.applications builder of a base (VGG16 for vgg16)."""
    return getattr(keras.applications, spec.application)


def preprocess_layer(spec: BaseSpec) -> keras.layers.Layer:
    """A layer mapping raw 0..255 RGB to `spec`'s expected input."""
    return Preprocess(spec.preprocess_mode, name="preprocess")


def truncate(trunk: keras.Model, cut_layer: str) -> keras.Model:
    """The part of `trunk` up to and including layer `cut_layer` (same layer objects, shared weights)."""
    names = [layer.name for layer in trunk.layers]
    if cut_layer not in names:
        raise ValueError(f"unknown cut layer {cut_layer!r} for {trunk.name}; valid layer names: {', '.join(names)}")
    return keras.Model(trunk.input, trunk.get_layer(cut_layer).output, name=f"{trunk.name}_to_{cut_layer}")


def build_trunk(spec: BaseSpec, image_size, *, cut_layer: str | None = None) -> keras.Model:
    """The notop keras.applications model (weights=None) for (H, W, 3), cut after `cut_layer` if given.

    Raises ValueError for a size under `spec.min_size` or an unknown cut
    layer (naming the block ends and every valid layer name).
    """
    height, width = image_hw(image_size)
    if min(height, width) < spec.min_size:
        raise ValueError(f"{spec.name} needs images of at least {spec.min_size}x{spec.min_size}, "
                         f"not {height}x{width}")
    trunk = application(spec)(include_top=False, weights=None, input_shape=(height, width, 3))
    if cut_layer is None:
        return trunk
    _check_cut(spec, trunk, cut_layer)
    return truncate(trunk, cut_layer)


def _check_cut(spec: BaseSpec, trunk: keras.Model, cut_layer: str) -> None:
    if cut_layer not in {layer.name for layer in trunk.layers}:
        raise UsageError("--cut-layer", f"unknown cut layer {cut_layer!r} for {spec.name}; block ends: "
                                        f"{', '.join(spec.block_ends)}; all layer names: "
                                        f"{', '.join(layer.name for layer in trunk.layers)}")


def check_cut_layer(spec: BaseSpec, image_size, cut_layer: str) -> None:
    """UsageError naming ``--cut-layer`` unless ``cut_layer`` is a layer of ``spec``'s trunk.

    Builds the trunk without weights (no file is read): the layer names exist
    only in the built architecture.
    """
    _check_cut(spec, build_trunk(spec, image_size), cut_layer)


@dataclass
class Backbone:
    """A trunk with its preprocessing: `model` maps raw 0..255 RGB to trunk features.

    `trunk` is the keras.applications part (nested in `model`), whose layers
    freeze plans name. `weights_report` says what the weights source filled.
    """

    model: keras.Model
    trunk: keras.Model
    spec: BaseSpec
    weights_report: WeightsReport
    source: WeightsSource | None = None


# EfficientNet's ImageNet file stores the standard deviations where its
# Normalization layer expects variances; keras.applications compensates with
# an extra Rescaling(1/sqrt(std)) only when it loads weights="imagenet"
# (tensorflow#49930). Our trunks are built with weights=None, so the
# correction goes into the variance instead: (x-m)/sqrt(v*std) == (x-m)/sqrt(v)/sqrt(std).
_IMAGENET_STD_RGB = np.asarray(TORCH_STD, dtype=np.float32)


def _correct_efficientnet_variance(trunk: keras.Model) -> list[str]:
    notes = []
    for layer in trunk.layers:
        if isinstance(layer, keras.layers.Normalization) and len(layer.weights) >= 2:
            mean, variance = (np.asarray(w) for w in layer.weights[:2])
            if variance.shape == (3,) and np.allclose(variance, _IMAGENET_STD_RGB, atol=1e-5):
                store = {str(i): np.asarray(w) for i, w in enumerate(layer.weights)}
                store["1"] = variance * _IMAGENET_STD_RGB
                layer.load_own_variables(store)
                notes.append(f"{layer.name}: variance set to std^2 (Keras EfficientNet ImageNet-file quirk)")
    return notes


def build_backbone(spec: BaseSpec, image_size, weights: str | WeightsSource, *,
                   cut_layer: str | None = None) -> Backbone:
    """Preprocess + trunk with weights applied; `weights` is a --weights value or a resolved source.

    Weights go into the full trunk before any cut (so Keras's ImageNet files
    load in their own layer order); the report then covers the kept layers.
    """
    source = weights if isinstance(weights, WeightsSource) else resolve_weights(weights, spec)
    trunk = build_trunk(spec, image_size)
    report = apply_weights(trunk, source)
    if spec.name.startswith("efficientnet") and source.kind != "none":
        report.notes.extend(_correct_efficientnet_variance(trunk))
    if cut_layer is not None:
        _check_cut(spec, trunk, cut_layer)
        trunk = truncate(trunk, cut_layer)
        report = report.restricted_to(layer.name for layer in trunk.layers)
    height, width = image_hw(image_size)
    inputs = keras.Input((height, width, 3), name="images")
    outputs = trunk(preprocess_layer(spec)(inputs))
    model = keras.Model(inputs, outputs, name=f"{spec.name}_backbone")
    return Backbone(model, trunk, spec, report, source)


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of `model`, looking inside nested models (the nested model itself included)."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(all_layers(layer))
    return found


def bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers of `model`, nested models included."""
    return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def set_trunk_trainable(trunk: keras.Model, trainable_layer_names: Iterable[str]) -> list[str]:
    """Make exactly the named trunk layers trainable, except BatchNormalization, which stays frozen.

    Keras 3.15's fit() ignores `trunk(x, training=False)` once layers are
    trainable (keras-team/keras#20285), so BN moving statistics would drift;
    `trainable = False` on each BN layer is what keeps them. Recompile with a
    fresh optimizer afterwards. Returns the names that ended up trainable.
    """
    wanted = set(trainable_layer_names)
    known = {layer.name for layer in all_layers(trunk)}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"layers not in {trunk.name}: {', '.join(unknown)}")
    trunk.trainable = True  # Keras propagates this to every sub-layer; then each is set below
    trainable = []
    for layer in all_layers(trunk):
        if isinstance(layer, keras.Model):
            continue
        layer.trainable = layer.name in wanted and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable
