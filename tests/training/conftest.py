"""Fixtures for the training tests: small image folders and weight files written the way Keras writes them."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from PIL import Image


def class_image(label: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image whose class shows in its colour and stripe direction, with noise."""
    height, width = size
    base = np.zeros((height, width, 3), dtype=np.float32)
    base[..., label % 3] = 160.0
    stripes = (np.arange(width if label % 2 else height) // 4) % 2 * 60.0
    base += stripes[None, :, None] if label % 2 else stripes[:, None, None]
    base += rng.normal(0.0, 20.0, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def make_image_folder(root, classes: dict[str, int], *, size=(40, 48), seed: int = 0,
                      extension: str = "png") -> str:
    """Write `classes` (name -> count) as root/<name>/<i>.<extension>; returns root."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(classes.items()):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index in range(count):
            pixels = class_image(label, size, rng)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{index:03d}.{extension}"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of six 40x48 PNGs and a third of five JPEGs."""
    root = tmp_path / "images"
    make_image_folder(root, {"cat": 6, "dog": 6})
    make_image_folder(root, {"emu": 5}, extension="jpg", seed=1)
    return str(root)


def write_legacy_h5(model, path: str, *, keras1_names: bool = False, skip: tuple[str, ...] = ()) -> str:
    """Save `model`'s weights in the Keras 1/2 h5 layout (what keras.applications' ImageNet files use).

    Root attributes layer_names/backend/keras_version; one group per layer with
    a weight_names attribute and one dataset per name. `keras1_names` writes
    names like the real ImageNet files (block1_conv1_W_1:0) instead of
    block1_conv1/kernel:0. Layers named in `skip` are left out.
    """
    layers = [layer for layer in model.layers if layer.name not in skip]
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [layer.name.encode() for layer in layers]
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["keras_version"] = b"2.2.4"
        for layer in layers:
            group = handle.create_group(layer.name)
            names = []
            # Keras 2 saved a nested model as one group whose weight names
            # carry the inner layers' names.
            owners = [inner for inner in layer.layers if inner.weights] if hasattr(layer, "layers") else [layer]
            for owner in owners:
                for index, variable in enumerate(owner.weights):
                    if keras1_names:
                        name = f"{owner.name}_{'Wb'[index] if index < 2 else index}_1:0"
                    else:
                        name = f"{owner.name}/{variable.name}:0"
                    group.create_dataset(name, data=np.asarray(variable))
                    names.append(name.encode())
            group.attrs["weight_names"] = names
    return path


def randomize(model, seed: int) -> None:
    """Give every variable of `model` distinct random values (so copies are detectable)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "float" not in str(variable.dtype):
            continue  # e.g. Normalization's sample count
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            variable.assign(rng.normal(0.0, 0.05, shape).astype(np.float32))
