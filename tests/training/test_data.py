"""Scanning class folders, splitting, and the tf.data pipelines (real files, real decoding)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from tests.training.conftest import make_image_folder
from training.data import (
    ImageSet, augmentation, decode_and_resize, image_hw, load_arrays, make_dataset, sample_per_class,
    scan_image_folder, split_image_set,
)

SIZE = (32, 32)


def test_scan_sorts_classes_and_reads_every_image(image_folder):
    # Files the scan must ignore: another extension, hidden files, a hidden folder.
    open(os.path.join(image_folder, "cat", "notes.txt"), "w").close()
    open(os.path.join(image_folder, "cat", ".hidden.png"), "w").close()
    os.makedirs(os.path.join(image_folder, ".cache"))
    # Nested folders and upper-case extensions belong to their class.
    os.makedirs(os.path.join(image_folder, "dog", "more"))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(os.path.join(image_folder, "dog", "more", "x.PNG"))

    images = scan_image_folder(image_folder)
    assert images.class_names == ["cat", "dog", "emu"]
    assert images.per_class_counts() == {"cat": 6, "dog": 7, "emu": 5}
    assert len(images) == 18 and images.skipped == []
    assert all(os.path.isabs(path) for path in images.files)
    assert {os.path.basename(os.path.dirname(p)) for p, label in zip(images.files, images.labels)
            if label == 2} == {"emu"}
    assert images.labels == sorted(images.labels)  # class by class, files sorted within


def test_corrupt_and_undecodable_files_are_skipped_and_reported(image_folder):
    cat = os.path.join(image_folder, "cat")
    good = open(os.path.join(cat, "000.png"), "rb").read()
    with open(os.path.join(cat, "truncated.png"), "wb") as handle:
        handle.write(good[: len(good) // 2])
    with open(os.path.join(cat, "garbage.jpg"), "wb") as handle:
        handle.write(os.urandom(300))
    webp = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(webp, format="WEBP")
    with open(os.path.join(cat, "webp_in_disguise.jpg"), "wb") as handle:
        handle.write(webp.getvalue())

    images = scan_image_folder(image_folder)
    skipped = {os.path.basename(path): reason for path, reason in images.skipped}
    assert set(skipped) == {"truncated.png", "garbage.jpg", "webp_in_disguise.jpg"}
    assert "WEBP" in skipped["webp_in_disguise.jpg"]
    assert images.per_class_counts()["cat"] == 6
    # The pipeline reads every kept file without error.
    pixels, labels = load_arrays(images, SIZE)
    assert pixels.shape == (17, 32, 32, 3) and labels.tolist() == images.labels

    unchecked = scan_image_folder(image_folder, check_images=False)
    assert len(unchecked) == 20 and unchecked.skipped == []


@pytest.mark.parametrize("layout, message", [
    ({}, "no class folders"),
    ({"only": 3}, "single class"),
    ({"a": 3, "b": 0}, "no usable images"),
])
def test_bad_folders_give_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    make_image_folder(root, layout)
    with pytest.raises(ValueError, match=message):
        scan_image_folder(root)


def test_missing_directory_and_all_corrupt_class(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    root = make_image_folder(tmp_path / "data", {"a": 2, "b": 0})
    with open(os.path.join(root, "b", "bad.png"), "wb") as handle:
        handle.write(b"not a png")
    with pytest.raises(ValueError, match=r"b has no usable images \(1 unreadable"):
        scan_image_folder(root)


def test_images_outside_class_folders_are_reported(image_folder):
    Image.new("RGB", (8, 8)).save(os.path.join(image_folder, "stray.png"))
    images = scan_image_folder(image_folder)
    assert [os.path.basename(p) for p, _ in images.skipped] == ["stray.png"]


def test_fingerprint_is_stable_and_sees_changes(image_folder):
    first = scan_image_folder(image_folder).fingerprint()
    assert scan_image_folder(image_folder).fingerprint() == first
    Image.new("RGB", (33, 33), (5, 5, 5)).save(os.path.join(image_folder, "dog", "new.png"))
    assert scan_image_folder(image_folder).fingerprint() != first


def test_split_is_stratified_disjoint_and_deterministic(tmp_path):
    images = scan_image_folder(make_image_folder(tmp_path / "d", {"a": 10, "b": 20, "c": 1}))
    train, val = split_image_set(images, 0.2, seed=3)
    assert val.per_class_counts() == {"a": 2, "b": 4, "c": 0}
    assert train.per_class_counts() == {"a": 8, "b": 16, "c": 1}
    assert not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == sorted(images.files)
    assert all(images.labels[images.files.index(p)] == label for p, label in zip(val.files, val.labels))
    again_train, again_val = split_image_set(images, 0.2, seed=3)
    assert again_val.files == val.files and again_train.files == train.files
    assert split_image_set(images, 0.2, seed=4)[1].files != val.files
    assert val.class_names == images.class_names and val.fingerprint() != train.fingerprint()
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            split_image_set(images, fraction, seed=0)


def test_augmentation_matches_the_article_settings():
    layers = {layer.__class__.__name__: layer.get_config() for layer in augmentation(0).layers}
    assert layers["RandomFlip"]["mode"] == "horizontal"
    assert layers["RandomZoom"]["height_factor"] == 0.3 and layers["RandomZoom"]["width_factor"] == 0.3
    assert layers["RandomTranslation"]["height_factor"] == 0.3
    assert layers["RandomTranslation"]["width_factor"] == 0.3
    assert tuple(layers["RandomRotation"]["factor"]) == pytest.approx((-30 / 360, 30 / 360))
    assert all(config.get("fill_mode", "nearest") == "nearest" for config in layers.values())


def _epoch(dataset):
    batches = [(x.numpy(), y.numpy()) for x, y in dataset]
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def test_validation_pipeline_is_stable_and_unaugmented(image_folder):
    images = scan_image_folder(image_folder)
    dataset = make_dataset(images, SIZE, 4, training=False, seed=0)
    x1, y1 = _epoch(dataset)
    x2, y2 = _epoch(dataset)
    assert x1.dtype == np.float32 and y1.dtype == np.int32 and x1.shape == (17, 32, 32, 3)
    assert np.array_equal(x1, x2) and y1.tolist() == y2.tolist() == images.labels  # no shuffle
    assert 0.0 <= x1.min() and x1.max() <= 255.0
    pixels, labels = load_arrays(images, SIZE)
    assert np.array_equal(pixels, x1) and np.array_equal(labels, y1)


def test_training_pipeline_caches_before_augmenting(image_folder):
    images = scan_image_folder(image_folder)
    plain, _ = load_arrays(images, SIZE)
    dataset = make_dataset(images, SIZE, 5, training=True, seed=1)
    first_x, first_y = _epoch(dataset)
    second_x, second_y = _epoch(dataset)
    assert sorted(first_y.tolist()) == sorted(second_y.tolist()) == sorted(images.labels)
    # Augmented: no training image equals a plain one; each epoch draws afresh
    # (a cache after augmentation would replay the first epoch).
    assert not any(np.allclose(image, original) for image in first_x for original in plain)
    assert not any(np.array_equal(again, seen) for again in second_x for seen in first_x)
    assert first_x.dtype == np.float32 and first_x.shape == (17, 32, 32, 3)

    shuffled_x, shuffled_y = _epoch(make_dataset(images, SIZE, 5, training=True, seed=1, augment=False))
    # Without augmentation the training pipeline serves exactly the decoded images, shuffled.
    assert shuffled_y.tolist() != images.labels
    order = [next(i for i, original in enumerate(plain) if np.array_equal(image, original)) for image in shuffled_x]
    assert sorted(order) == list(range(len(images)))


def test_same_seed_gives_the_same_training_stream(image_folder):
    images = scan_image_folder(image_folder)
    a, _ = _epoch(make_dataset(images, SIZE, 6, training=True, seed=7))
    b, _ = _epoch(make_dataset(images, SIZE, 6, training=True, seed=7))
    assert np.allclose(a, b)


def test_decoding_keeps_colours_for_every_format(tmp_path):
    colours = {"png": (200, 10, 30), "bmp": (10, 200, 30), "gif": (255, 255, 0), "jpeg": (40, 40, 220)}
    root = tmp_path / "colours"
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        image = Image.new("RGB", (24, 16), colour)
        if name == "gif":
            image = image.convert("P")
        image.save(root / name / f"solid.{name}")
    images = scan_image_folder(root)
    pixels, labels = load_arrays(images, (8, 12))
    for image, label in zip(pixels, labels):
        expected = colours[images.class_names[label]]
        assert image.shape == (8, 12, 3)
        assert np.allclose(image.mean(axis=(0, 1)), expected, atol=4), images.class_names[label]


def test_decode_and_resize_matches_the_pipeline_on_bytes(image_folder):
    images = scan_image_folder(image_folder)
    with open(images.files[0], "rb") as handle:
        decoded = decode_and_resize(handle.read(), SIZE).numpy()
    assert np.array_equal(decoded, load_arrays(images, SIZE)[0][0])


def test_empty_image_set_and_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError):
        make_dataset(ImageSet(str(tmp_path), ["a", "b"], [], []), SIZE, 4, training=False, seed=0)
    images = ImageSet(str(tmp_path), ["a", "b"], ["x.png"], [0])
    with pytest.raises(ValueError):
        make_dataset(images, SIZE, 0, training=False, seed=0)
    with pytest.raises(ValueError):
        make_dataset(images, (0, 4), 1, training=False, seed=0)


def test_image_hw_reads_a_square_or_height_and_width():
    assert image_hw(32) == (32, 32)
    assert image_hw(np.int64(32)) == (32, 32)
    assert image_hw((24, 40)) == (24, 40)
    assert image_hw([np.int32(24), 40.0]) == (24, 40)
    assert all(type(side) is int for side in image_hw(np.int64(8)))


def test_sample_per_class_caps_each_class_by_seed(image_folder):
    images = scan_image_folder(image_folder)
    sample = sample_per_class(images, 2, seed=4)
    assert sample.per_class_counts() == {"cat": 2, "dog": 2, "emu": 2}
    assert sample.files == sorted(sample.files) and set(sample.files) <= set(images.files)
    assert [images.labels[images.files.index(f)] for f in sample.files] == sample.labels
    assert sample_per_class(images, 2, seed=4).files == sample.files
    assert sample_per_class(images, 10, seed=0).files == images.files
