"""Decoding images that come from users (a photo to redraw, an upload): checked by decoding, never by name.

Pillow refuses only images above ~179 M pixels (and merely warns above ~89 M), far more than any generation
needs and enough to exhaust memory. Here the pixel count is checked from the header before the pixels are
decoded, the format must be one of an allow-list, and the image must decode in full (a truncated file opens
fine and fails only when loaded).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "ImageRejected", "decode_image"]

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_PIXELS = 4096 * 4096  # 16.8 M pixels: a 4K photo fits, a decompression bomb does not


class ImageRejected(ValueError):
    """An image that is not one the caller may decode: unreadable, of another format, or too large."""


def decode_image(
    source: bytes | str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = ALLOWED_FORMATS,
    name: str = "image",
) -> Image.Image:
    """An RGB image, turned upright as its EXIF says; ``ImageRejected`` with a clear message otherwise.
    ``name`` is how the message calls the input (e.g. the setting or form field it came from)."""
    if isinstance(source, bytes):
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.is_file():
            raise FileNotFoundError(f"{name}={source} is not a file.")
    try:
        with Image.open(stream) as image:
            if image.format not in formats:
                raise ImageRejected(f"{name} is a {image.format} image; accepted: {', '.join(formats)}.")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"{name} is {width}x{height} = {width * height} pixels, more than the {max_pixels} accepted."
                )
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ImageRejected(f"{name} could not be decoded as an image ({type(error).__name__}).") from None
