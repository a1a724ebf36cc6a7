"""The ``Preprocess`` layer: a base's input preprocessing inside the model, so exports take raw pixels.

Its own module because two sides need it: training.bases puts it in front of
every trunk, and training.weights must have it registered before it reads a
whole ``.keras`` model that contains it.
"""

from __future__ import annotations

import keras
from keras import ops

PREPROCESS_MODES = ("caffe", "tf", "torch", "none")
# keras.applications.imagenet_utils constants, restated so the layer needs no Keras internals.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="graft")
class Preprocess(keras.layers.Layer):
    """Raw 0..255 RGB -> a base's expected input, inside the model (so exports take raw pixels).

    caffe: RGB->BGR, minus the ImageNet BGR means; tf: x / 127.5 - 1;
    torch: x / 255, minus the ImageNet means, over the standard deviations;
    none: unchanged (the base rescales itself). Runs in float32 whatever the
    global dtype policy.
    """

    def __init__(self, mode: str, **kwargs):
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess mode must be one of {', '.join(PREPROCESS_MODES)}, not {mode!r}")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        """Apply the mode's arithmetic."""
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return input_shape

    def get_config(self):
        """Serializable config (mode)."""
        return {**super().get_config(), "mode": self.mode}
