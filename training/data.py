"""Class-per-folder image sets: scan, split, tf.data pipelines and the article's augmentation."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from training import folders
from training.errors import UsageError

# What tf.io.decode_image can decode: a file Pillow reads in another format
# (say WebP renamed .jpg) would crash the input pipeline mid-epoch.
_DECODABLE_FORMATS = {"JPEG", "PNG", "BMP", "GIF"}
# The article's ImageDataGenerator fills with the nearest pixel; Keras layers
# default to "reflect".
_FILL_MODE = "nearest"


@dataclass
class ImageSet:
    """The images of a class-per-folder directory, with their labels and what was skipped.

    `files` are absolute paths; `labels` index `class_names`; `skipped` lists
    (path, reason) for unreadable or corrupt files.
    """

    root: str
    class_names: list[str]
    files: list[str]
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def per_class_counts(self) -> dict[str, int]:
        """Images per class, in class order (classes without images count 0)."""
        counts = Counter(self.labels)
        return {name: counts.get(index, 0) for index, name in enumerate(self.class_names)}

    def fingerprint(self) -> str:
        """sha256 over class names and each file's relative path, size and label."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.class_names).encode())
        for path, label in sorted(zip(self.files, self.labels)):
            relative = os.path.relpath(path, self.root).replace(os.sep, "/")
            digest.update(f"\0{relative}\0{os.path.getsize(path)}\0{label}".encode())
        return digest.hexdigest()


def _check_image(path: str) -> str | None:
    """Return why the image at `path` cannot be used, or None when it decodes."""
    try:
        with Image.open(path) as image:
            image_format = image.format
            image.verify()  # catches bad PNG checksums that load() lets through
        if image_format not in _DECODABLE_FORMATS:
            return f"format {image_format} is not decodable by TensorFlow (JPEG, PNG, BMP, GIF)"
        with Image.open(path) as image:
            # Draft mode decodes a JPEG at reduced scale: every byte is still
            # read, so truncation shows, at a fraction of the cost.
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as error:  # Pillow raises many types for bad files
        return f"{type(error).__name__}: {error}"
    return None


def scan_image_folder(root: str | os.PathLike, *, check_images: bool = True) -> ImageSet:
    """Scan `root/<class>/**/<image>`; class names are the sorted sub-folder names.

    Files with the extensions jpg, jpeg, png, bmp, gif (any case) are images;
    others and hidden entries are ignored. With `check_images`, each image is
    opened with Pillow and skipped (and listed in `skipped`) when it is
    unreadable, corrupt or in a format TensorFlow cannot decode. Raises
    UsageError (the caller names the flag) for a missing or empty directory,
    a single class, or a class without a usable image.
    """
    root = os.path.abspath(os.fspath(root))
    class_names = folders.class_names(root)
    skipped: list[tuple[str, str]] = [(path, "image outside a class folder") for path in folders.stray_images(root)]
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = 0
        class_dir = os.path.join(root, name)
        for path in folders.image_files(class_dir):
            reason = _check_image(path) if check_images else None
            if reason is not None:
                skipped.append((path, reason))
                continue
            files.append(path)
            labels.append(label)
            found += 1
        if not found:
            bad = sum(1 for path, _ in skipped if path.startswith(class_dir + os.sep))
            detail = f" ({bad} unreadable file(s) skipped)" if bad else ""
            raise UsageError(None, f"class folder {class_dir} has no usable images{detail}")
    return ImageSet(root, class_names, files, labels, skipped)


def split_image_set(images: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split into (train, validation), stratified by class and deterministic for a seed.

    Each class with at least two images gives round(n * val_fraction) of them,
    at least one and at most n - 1, to validation. Both parts keep the class
    names; `skipped` stays on the scanned set (both parts get an empty list).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    val_index: list[int] = []
    for label in range(len(images.class_names)):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        count = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val_index.extend(rng.permutation(members)[:count].tolist())
    if not val_index:
        raise ValueError("no class has two images: nothing to split off for validation")
    chosen = set(val_index)

    def part(indices: list[int]) -> ImageSet:
        return ImageSet(images.root, list(images.class_names), [images.files[i] for i in indices],
                        [images.labels[i] for i in indices], [])

    train = [i for i in range(len(images)) if i not in chosen]
    return part(train), part(sorted(chosen))


def sample_per_class(images: ImageSet, per_class: int, seed: int) -> ImageSet:
    """At most ``per_class`` images of each class, chosen by ``seed``, in file order (no skipped list)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    keep: list[int] = []
    for label in range(len(images.class_names)):
        members = np.flatnonzero(labels == label)
        keep.extend(sorted(rng.permutation(members)[:per_class].tolist()))
    keep.sort()
    return ImageSet(images.root, list(images.class_names), [images.files[i] for i in keep],
                    [images.labels[i] for i in keep], [])


def augmentation(seed: int) -> keras.Sequential:
    """The article's ImageDataGenerator settings as Keras layers (training split only).

    Horizontal flip, zoom 0.3, width and height shift 0.3, rotation 30 degrees,
    filling with the nearest pixel as ImageDataGenerator does.
    """
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        # ImageDataGenerator zooms width and height independently.
        keras.layers.RandomZoom(0.3, 0.3, fill_mode=_FILL_MODE, seed=seed + 1),
        keras.layers.RandomTranslation(0.3, 0.3, fill_mode=_FILL_MODE, seed=seed + 2),
        keras.layers.RandomRotation(30 / 360, fill_mode=_FILL_MODE, seed=seed + 3),
    ], name="augmentation")


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """An image size given as N (a square) or (H, W), as ``(H, W)`` ints."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    height, width = (int(side) for side in image_size)
    return height, width


def _check_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    height, width = image_hw(image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, not {image_size}")
    return height, width


def decode_and_resize(data: tf.Tensor, image_size: int | tuple[int, int]) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF bytes -> float32 [H, W, 3] in 0..255 (bilinear resize).

    The one decoding rule of training; export uses it so that served images
    see the same pixels.
    """
    size = _check_size(image_size)
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(image, size, method="bilinear")
    image.set_shape((*size, 3))
    return image


def make_dataset(images: ImageSet, image_size: int | tuple[int, int], batch_size: int, *, training: bool,
                 seed: int, augment: bool = True, cache: bool | str = True) -> tf.data.Dataset:
    """A tf.data pipeline of (float32 [B, H, W, 3] in 0..255, int32 [B]) batches.

    Decoded, resized images are cached (`cache`: True in memory, a str is a
    cache file prefix, False none) before anything random happens, so each
    epoch shuffles and augments afresh. Shuffling and augmentation happen only
    when `training`; augmentation also needs `augment`. `image_size` is
    (height, width) or one int for a square.
    """
    if not len(images):
        raise ValueError(f"no images to read from {images.root}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    size = _check_size(image_size)
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(images.files), tf.constant(images.labels, dtype=tf.int32)))
    dataset = dataset.map(lambda path, label: (decode_and_resize(tf.io.read_file(path), size), label),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        dataset = dataset.cache("" if cache is True else cache)
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if training and augment:
        layers = augmentation(seed)
        # Sequential on purpose: the random layers advance one seed state, and
        # parallel calls would advance it in a different order on each run.
        dataset = dataset.map(lambda batch, label: (layers(batch, training=True), label))
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_arrays(images: ImageSet, image_size: int | tuple[int, int], *,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """All images as float32 [N, H, W, 3] in 0..255 and labels int32 [N], in file order (small sets)."""
    dataset = make_dataset(images, image_size, batch_size, training=False, seed=0,
                           augment=False, cache=False)
    pixels, labels = [], []
    for batch, label in dataset:
        pixels.append(batch.numpy())
        labels.append(label.numpy())
    return np.concatenate(pixels).astype(np.float32), np.concatenate(labels).astype(np.int32)
