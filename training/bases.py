"""Backbone registry: keras.applications trunks with their preprocessing built into the model.

A backbone takes raw 0..255 RGB (what exported models accept) and applies
its base's preprocess_input inside the graph, then the notop trunk, possibly
cut at a block end. Weights come from training.weights, never from a download.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import keras
import numpy as np

from training.data import image_hw
from training.preprocess import TORCH_STD, Preprocess
from training.weights import WeightsReport, WeightsSource, apply_weights, resolve_weights


@dataclass(frozen=True)
class BaseSpec:
    """One supported base network.

    block_ends: layer names at stage boundaries, shallow to deep (probes read
    them; scenario 3 cuts at one). The last one ends the trunk's last stage.
    weights_file: the file name Keras caches the notop ImageNet weights under.
    """

    name: str
    builder: Callable[..., keras.Model]
    preprocess_mode: str  # "caffe" | "tf" | "torch" | "none"
    default_size: int
    min_size: int
    block_ends: tuple[str, ...]
    weights_file: str


BASES: Mapping[str, BaseSpec] = MappingProxyType({spec.name: spec for spec in (
    BaseSpec("vgg16", keras.applications.VGG16, "caffe", 224, 32,
             ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BaseSpec("vgg19", keras.applications.VGG19, "caffe", 224, 32,
             ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
             "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BaseSpec("resnet50", keras.applications.ResNet50, "caffe", 224, 32,
             ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    # Keras picks the MobileNetV2 file by input rows (96..224); the 224 one is
    # its default. Other sizes: pass that file's path as --weights.
    BaseSpec("mobilenet_v2", keras.applications.MobileNetV2, "tf", 224, 32,
             ("block_2_add", "block_5_add", "block_12_add", "out_relu"),
             "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    # MobileNetV3 ends in an auto-named hard-swish layer; conv_1_bn, just
    # before it, stands for the last stage.
    BaseSpec("mobilenet_v3_small", keras.applications.MobileNetV3Small, "none", 224, 32,
             ("expanded_conv_project_bn", "expanded_conv_2_add", "expanded_conv_7_add", "conv_1_bn"),
             "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    BaseSpec("mobilenet_v3_large", keras.applications.MobileNetV3Large, "none", 224, 32,
             ("expanded_conv_2_add", "expanded_conv_5_add", "expanded_conv_11_add", "conv_1_bn"),
             "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    BaseSpec("efficientnet_b0", keras.applications.EfficientNetB0, "none", 224, 32,
             ("block2b_add", "block3b_add", "block5c_add", "top_activation"),
             "efficientnetb0_notop.h5"),
    BaseSpec("inception_v3", keras.applications.InceptionV3, "tf", 299, 75,
             ("mixed2", "mixed7", "mixed10"),
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
)})


def get_base(name: str) -> BaseSpec:
    """The spec of a base by name; ValueError lists the choices."""
    key = str(name).strip().lower()
    if key not in BASES:
        raise ValueError(f"unknown base {name!r}; choose one of: {', '.join(BASES)}")
    return BASES[key]


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
    trunk = spec.builder(include_top=False, weights=None, input_shape=(height, width, 3))
    if cut_layer is None:
        return trunk
    _check_cut(spec, trunk, cut_layer)
    return truncate(trunk, cut_layer)


def _check_cut(spec: BaseSpec, trunk: keras.Model, cut_layer: str) -> None:
    if cut_layer not in {layer.name for layer in trunk.layers}:
        raise ValueError(f"unknown cut layer {cut_layer!r} for {spec.name}; block ends: "
                         f"{', '.join(spec.block_ends)}; all layer names: "
                         f"{', '.join(layer.name for layer in trunk.layers)}")


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
