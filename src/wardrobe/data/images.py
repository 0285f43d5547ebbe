"""Reading picture files, defined once for prepare (image folders) and predict (your own pictures).

PIL and NumPy only: predict's TensorFlow-free install imports it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wardrobe.common import WardrobeError, complete_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
# Decoding is refused above this many pixels (a 64-megapixel photo), before any pixel is read.
MAX_PIXELS = 64_000_000


class PictureTooLarge(WardrobeError):
    """A picture over MAX_PIXELS (or PIL's own decompression-bomb limit): refused unread."""


def decode_image(path: Path, channels: int, data: bytes | None = None) -> np.ndarray:
    """One image file (first frame) as uint8 H×W (channels 1: grayscale) or H×W×3 (RGB);
    transparent parts become white. A bad file raises WardrobeError naming it. `data`: the file's
    bytes, already read (prepare hashes the same bytes it decodes)."""
    try:
        # PIL reads only the header at open. Its own bomb check (a warning above its
        # MAX_IMAGE_PIXELS, about 89 megapixels, made fatal here; an error above twice that) fires
        # there; the lower cap is checked from the same header, before any pixel is decoded, without
        # changing PIL's process-wide limit.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if data is not None else path)
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}×{image.height}")
            image.seek(0)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # Transparent parts become white, like the page behind a product cut-out.
                background = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(background, image.convert("RGBA"))
            rgb = image.convert("RGB")
            pixels = np.asarray(ImageOps.grayscale(rgb) if channels == 1 else rgb)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PictureTooLarge(f"{path}: image is over the {MAX_PIXELS:,}-pixel cap") from exc
    except UnidentifiedImageError as exc:
        raise WardrobeError(f"{path}: not a readable image ({type(exc).__name__})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise WardrobeError(f"{path}: cannot decode image: {complete_text(exc)}") from exc
    if pixels.size == 0:
        raise WardrobeError(f"{path}: image has no pixels")
    return pixels


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 pixels to height×width (Lanczos), unchanged if already that size."""
    if pixels.shape[:2] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.Resampling.LANCZOS))
