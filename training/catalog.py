"""The supported bases as plain facts: names, sizes, block ends, the Keras cache file.

No TensorFlow here, so that graft-train can check ``--base``, ``--image-size``
and ``--weights`` before it loads TensorFlow. training.bases turns a spec into
a network (``keras.applications.<application>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class BaseSpec:
    """One supported base network.

    application: the keras.applications builder's name (VGG16).
    block_ends: layer names at stage boundaries, shallow to deep (probes read
    them; scenario 3 cuts at one). The last one ends the trunk's last stage.
    weights_file: the file name Keras caches the notop ImageNet weights under.
    """

    name: str
    application: str
    preprocess_mode: str  # "caffe" | "tf" | "torch" | "none"
    default_size: int
    min_size: int
    block_ends: tuple[str, ...]
    weights_file: str


BASES: Mapping[str, BaseSpec] = MappingProxyType({spec.name: spec for spec in (
    BaseSpec("vgg16", "VGG16", "caffe", 224, 32,
             ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BaseSpec("vgg19", "VGG19", "caffe", 224, 32,
             ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
             "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BaseSpec("resnet50", "ResNet50", "caffe", 224, 32,
             ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    # Keras picks the MobileNetV2 file by input rows (96..224); the 224 one is
    # its default. Other sizes: pass that file's path as --weights.
    BaseSpec("mobilenet_v2", "MobileNetV2", "tf", 224, 32,
             ("block_2_add", "block_5_add", "block_12_add", "out_relu"),
             "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    # MobileNetV3 ends in an auto-named hard-swish layer; conv_1_bn, just
    # before it, stands for the last stage.
    BaseSpec("mobilenet_v3_small", "MobileNetV3Small", "none", 224, 32,
             ("expanded_conv_project_bn", "expanded_conv_2_add", "expanded_conv_7_add", "conv_1_bn"),
             "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    BaseSpec("mobilenet_v3_large", "MobileNetV3Large", "none", 224, 32,
             ("expanded_conv_2_add", "expanded_conv_5_add", "expanded_conv_11_add", "conv_1_bn"),
             "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    BaseSpec("efficientnet_b0", "EfficientNetB0", "none", 224, 32,
             ("block2b_add", "block3b_add", "block5c_add", "top_activation"),
             "efficientnetb0_notop.h5"),
    BaseSpec("inception_v3", "InceptionV3", "tf", 299, 75,
             ("mixed2", "mixed7", "mixed10"),
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
)})


def base_key(name: str) -> str:
    """A ``--base`` value as the catalog spells it: trimmed, lower case."""
    return str(name).strip().lower()


def get_base(name: str) -> BaseSpec:
    """The spec of a base by name; ValueError lists the choices."""
    key = base_key(name)
    if key not in BASES:
        raise ValueError(f"unknown base {name!r}; choose one of: {', '.join(BASES)}")
    return BASES[key]
