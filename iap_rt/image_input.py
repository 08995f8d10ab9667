"""Image input for editing: an image or a mask from a file or uploaded bytes, decoded as the
PIL-based tools people know do it (diffusers' ``load_image``: EXIF orientation applied, then
RGB), with the cases they get wrong made right and every bad input a clear error.

- EXIF orientation is applied (a phone photo is edited the way it is shown);
- alpha is dropped for the image (its colour channels are kept, as ``convert("RGB")`` does);
  for a mask, :func:`load_mask` reads white = repaint, and :func:`mask_from_alpha` reads
  OpenAI's convention (fully transparent = repaint);
- greyscale and palette images become RGB; 16-bit images are scaled to 8 bits (PIL's own
  conversion would clip them to white);
- a file that is not an image, is truncated, or has more pixels than ``max_pixels`` is refused
  *before* its pixels are decoded (decompression bombs included).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from iap_rt.errors import InputError

DEFAULT_MAX_PIXELS = 4096 * 4096


def open_image(source, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A decoded, EXIF-oriented PIL image from a path or bytes; :class:`InputError` naming
    ``what`` for anything else."""
    name = f"the {what}" if isinstance(source, (bytes, bytearray)) else f"{what} {source}"
    try:
        raw = bytes(source) if isinstance(source, (bytes, bytearray)) else _read(source, name)
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise InputError(f"{name} is {w}x{h} = {w * h} pixels; at most {max_pixels} are "
                                 "allowed", fix="downscale it first.")  # fmt: skip
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InputError(f"{name} is not an image PIL can read ({e})",
                         fix="pass a PNG, JPEG or WebP file.") from None  # fmt: skip
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name} cannot be decoded: {e} (truncated or damaged?)",
                         fix="pass the whole file.") from None  # fmt: skip


def _read(path, name: str) -> bytes:
    try:
        return open(os.fspath(path), "rb").read()  # noqa: SIM115 - read whole, closed at once
    except FileNotFoundError:
        raise InputError(f"{name} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{name} is a directory, not an image file") from None


def to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8: colour channels of RGB(A), greyscale replicated, palette expanded,
    16-bit scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def to_mask(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a mask image: its luminance (white = repaint); a greyscale+alpha or
    RGBA mask counts only where it is opaque (transparent = keep)."""
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        lum = np.asarray(img.convert("L"), dtype=np.float32)
        return (lum * rgba[..., 3] / 255.0).round().astype(np.uint8)
    return to_rgb(img).mean(axis=2).round().astype(np.uint8)


def mask_from_alpha(img: Image.Image) -> np.ndarray | None:
    """OpenAI's convention: the fully transparent pixels of ``img`` are the region to edit
    (255), the rest is kept (0); None when ``img`` has no alpha channel."""
    if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
        return None
    alpha = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., 3]
    return np.where(alpha == 0, 255, 0).astype(np.uint8)


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """``array`` (H, W, 3) or (H, W) uint8 resized with Lanczos (diffusers' default)."""
    img = Image.fromarray(array)
    return np.asarray(img.resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image to edit as (H, W, 3) uint8 from a path or bytes."""
    return to_rgb(open_image(source, "image", max_pixels))


def load_mask(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A mask (white = repaint, black = keep) as (H, W) uint8 from a path or bytes."""
    return to_mask(open_image(source, "mask", max_pixels))
