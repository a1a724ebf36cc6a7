"""Image bytes: decoding for image inputs, and the pixel limit checked from the header.

A decompression bomb is refused before any pixel is decoded.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError
from tensorflow.core.example import example_pb2

from serving.errors import InvalidArgument, located


def decode_image(data: bytes, height: int, width: int, *, max_pixels: int) -> np.ndarray:
    """JPEG/PNG/... bytes -> float32 [height, width, 3] RGB in 0..255.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing; Pillow's own global limit is left untouched.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidArgument(
                    f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
                )
            # JPEG draft mode decodes at a reduced scale when the target is smaller.
            img.draft("RGB", (width, height))
            rgb = img.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.float32)
    except InvalidArgument:
        raise
    except UnidentifiedImageError:
        # Pillow's own message names an in-memory object's address, useless to a client.
        raise InvalidArgument("not a decodable image: unknown or unsupported image format") from None
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(f"not a decodable image: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports truncated or corrupt data as OSError/ValueError/SyntaxError.
        raise InvalidArgument(f"corrupt or truncated image: {exc}") from None


def check_image_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse encoded image bytes whose header declares more than ``max_pixels`` pixels.

    For string inputs a model decodes itself (``tf.io.decode_image`` in the graph,
    as graft's ``predict_images`` and ``classify`` do): only the header is read,
    so a small file that would decode to gigabytes is refused before TensorFlow
    allocates anything. Frames of an animated image count. Bytes that are not an
    image Pillow knows pass unchanged: the model judges them.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            frames = img.n_frames if getattr(img, "is_animated", False) else 1
    except Image.DecompressionBombError as exc:  # Pillow's own, far larger, limit
        raise InvalidArgument(f"image exceeds the limit of {max_pixels} pixels: {exc}") from None
    except Exception:  # not an image, or not one Pillow reads: not this check's business
        return
    pixels = width * height * frames
    if pixels > max_pixels:
        shape = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
        raise InvalidArgument(f"image of {shape} = {pixels} pixels exceeds the limit of {max_pixels}")


def check_example_images(serialized: bytes, max_pixels: int) -> None:
    """``check_image_pixels`` on every bytes value of a serialized tf.Example (undecodable ones pass)."""
    try:
        example = example_pb2.Example.FromString(serialized)
    except Exception:  # the model's parse_example reports it
        return
    for name, feature in example.features.feature.items():
        for value in feature.bytes_list.value:
            with located(f"feature '{name}'"):
                check_image_pixels(value, max_pixels)
