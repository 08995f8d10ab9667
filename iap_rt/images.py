"""PNG output: atomic writes, generation parameters in a PNG text chunk."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from iap_rt.errors import OutputError
from iap_rt.fileio import ensure_dir, write_bytes_atomic

PARAMS_KEY = "iap-rt"


def plan_outputs(out: str | os.PathLike, n_images: int) -> list[Path]:
    """Output paths for ``n_images``; check the destination is writable *before* generating.

    ``out`` ending in ``.png`` names the file for a single image; anything else is a
    directory receiving ``00000.png``, ``00001.png``, ... (never overwriting older images).
    """
    out = Path(out)
    if out.suffix.lower() == ".png":
        if n_images != 1:
            raise OutputError(
                f"--out {out} names one PNG file but {n_images} images will be generated",
                fix="pass a directory as --out for several images.",
            )
        ensure_dir(out.parent)
        if out.is_dir():
            raise OutputError(f"--out {out} is a directory", fix="pass a file name or a directory.")
        return [out]
    ensure_dir(out)
    taken = {p.stem for p in out.glob("*.png")}
    paths, i = [], 0
    while len(paths) < n_images:
        if f"{i:05d}" not in taken:
            paths.append(out / f"{i:05d}.png")
        i += 1
    return paths


def save_png(path: str | os.PathLike, image: np.ndarray, params: dict) -> Path:
    """Write one (H, W, 3) uint8 image atomically with ``params`` as an iTXt chunk."""
    return write_bytes_atomic(path, png_bytes(image, params))


def png_bytes(image: np.ndarray, params: dict) -> bytes:
    """One (H, W, 3) uint8 image as PNG bytes with ``params`` as an iTXt chunk (what
    :func:`save_png` writes; the server sends the same bytes)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMS_KEY, json.dumps(params, ensure_ascii=False, sort_keys=True))
    for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler"):
        if k in params:
            info.add_itxt(k, str(params[k]))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_params(path: str | os.PathLike) -> dict:
    """The generation parameters stored in a PNG written by :func:`save_png`."""
    with Image.open(path) as im:
        return json.loads(im.text[PARAMS_KEY])
