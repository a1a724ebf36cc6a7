"""The class-per-folder layout, read without opening an image: which folders are classes, which files images.

training.data scans with it (and then opens every image); graft-train's
argument checks use it to refuse a wrong ``--data`` or ``--val-data`` at once,
without TensorFlow. Errors are UsageErrors without a flag: the caller names it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from training.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def is_image_name(filename: str) -> bool:
    """Whether a file name counts as an image: a known extension (any case), not hidden."""
    return not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS)


def class_names(root: str | os.PathLike) -> list[str]:
    """The sorted class folder names under ``root``; UsageError unless there are at least two.

    Hidden entries are ignored. Raises for a missing directory, one without
    class folders, or one with a single class.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise UsageError(None, f"image directory {root} does not exist or is not a directory")
    try:
        entries = sorted(entry for entry in os.listdir(root) if not entry.startswith("."))
    except OSError as exc:  # unreadable: a permission, say
        raise UsageError(None, f"image directory {root} cannot be listed: {exc.strerror}") from exc
    names = [entry for entry in entries if os.path.isdir(os.path.join(root, entry))]
    if not names:
        raise UsageError(None, f"image directory {root} has no class folders: expected {root}/<class>/<image>")
    if len(names) == 1:
        raise UsageError(None, f"image directory {root} has a single class ({names[0]!r}); "
                               "classification needs at least two class folders")
    return names


def stray_images(root: str | os.PathLike) -> list[str]:
    """Image files directly in ``root``, outside every class folder (they are skipped)."""
    root = os.path.abspath(os.fspath(root))
    return [os.path.join(root, entry) for entry in sorted(os.listdir(root))
            if is_image_name(entry) and not os.path.isdir(os.path.join(root, entry))]


def image_files(class_dir: str | os.PathLike) -> Iterator[str]:
    """The image files of one class folder, its sub-folders included, in a stable sorted order."""
    for directory, subdirs, names in os.walk(os.fspath(class_dir)):  # no link loops
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for filename in sorted(names):
            if is_image_name(filename):
                yield os.path.join(directory, filename)


def check_layout(root: str | os.PathLike) -> list[str]:
    """The class names of ``root``, after checking that every class folder holds an image file.

    Reads directory entries only, and stops at each class's first image, so it
    costs little on any data set; whether the images decode is the scan's job.
    """
    names = class_names(root)
    root = os.path.abspath(os.fspath(root))
    for name in names:
        if next(image_files(os.path.join(root, name)), None) is None:
            raise UsageError(None, f"class folder {os.path.join(root, name)} has no images "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
    return names
