"""Image output: where ``--out`` puts each image, and atomic PNG/JPEG/WebP writes that carry
the generation parameters (PNG: an iTXt chunk; JPEG and WebP: an XMP packet)."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, PngImagePlugin

from iap_rt.errors import InputError, OutputError
from iap_rt.fileio import ensure_dir, write_bytes_atomic

PARAMS_KEY = "iap-rt"
# suffix -> Pillow format; JPEG at quality 95, WebP lossless (the pixels as generated)
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_SAVE_OPTIONS = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"lossless": True}}
XMP_NS = "http://ns.iap-rt.invalid/1.0/"  # a namespace name only (.invalid: never fetched)
_XMP_PARAMS = re.compile(r"<iaprt:params>(.*?)</iaprt:params>", re.S)


def plan_outputs(out: str | os.PathLike, n_images: int) -> Iterator[Path]:
    """Output paths for ``n_images`` (named lazily, so a huge batch costs nothing up front);
    the destination is checked and created *before* generating.

    ``out`` with an image suffix (.png, .jpg, .jpeg, .webp) is the file of a single image, in
    that format. A path without a suffix, ending in ``/``, or naming an existing directory is
    a directory receiving ``00000.png``, ``00001.png``, ... (never overwriting older images).
    Any other suffix is an error (``image.gif`` would otherwise become a directory).
    """
    text = os.fspath(out)
    out = Path(text)
    suffix = out.suffix.lower()
    is_dir = out.is_dir() or text.endswith(("/", os.sep)) or not suffix
    if not is_dir and suffix not in FORMATS:
        raise OutputError(
            f"--out {text}: unknown image suffix {out.suffix!r}",
            fix="end the file name with .png, .jpg, .jpeg or .webp for one image, or pass a "
            "directory (no suffix, or a trailing /) for numbered PNGs.",
        )
    if not is_dir:
        if n_images != 1:
            raise OutputError(
                f"--out {text} names one image file but {n_images} images will be generated",
                fix="pass a directory as --out for several images.",
            )
        ensure_dir(out.parent)
        return iter([out])
    ensure_dir(out)
    return _numbered(out, {p.stem for p in out.iterdir() if p.suffix.lower() in FORMATS}, n_images)


def _numbered(out: Path, taken: set[str], n: int) -> Iterator[Path]:
    i = 0
    while n:
        if f"{i:05d}" not in taken:
            yield out / f"{i:05d}.png"
            n -= 1
        i += 1


def save_image(
    path: str | os.PathLike, image: np.ndarray, params: dict, fmt: str | None = None
) -> Path:
    """Write one (H, W, 3) uint8 image atomically in ``fmt`` (default: the format its suffix
    names), with ``params`` embedded (PNG iTXt chunk, or an XMP packet in JPEG and WebP)."""
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt not in _SAVE_OPTIONS:
        raise InputError(
            f"{path}: unknown image suffix {path.suffix!r}", fix="use .png, .jpg or .webp."
        )
    return write_bytes_atomic(path, image_bytes(image, params, fmt))


def png_bytes(image: np.ndarray, params: dict) -> bytes:
    """One image as PNG bytes with ``params`` in an iTXt chunk (what :func:`save_png` writes;
    the server sends the same bytes)."""
    return image_bytes(image, params, "PNG")


def image_bytes(image: np.ndarray, params: dict, fmt: str) -> bytes:
    """One (H, W, 3) uint8 image encoded as ``fmt`` (PNG, JPEG, WEBP) with ``params``."""
    text = json.dumps(params, ensure_ascii=False, sort_keys=True)
    options = dict(_SAVE_OPTIONS[fmt])
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PARAMS_KEY, text)
        for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler"):
            if k in params:
                info.add_itxt(k, str(params[k]))
        options["pnginfo"] = info
    else:
        options["xmp"] = _xmp_packet(text, str(params.get("prompt", "")))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return buf.getvalue()


def save_png_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write PNG bytes made by :func:`png_bytes` (e.g. a server's answer) to ``path``: as they
    are for a .png path, re-encoded in the suffix's format (with the PNG's parameters) else."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower(), "PNG")
    if fmt == "PNG":
        return write_bytes_atomic(path, data)
    with Image.open(io.BytesIO(data)) as im:
        params = json.loads(im.text.get(PARAMS_KEY, "{}"))
        image = np.asarray(im.convert("RGB"))
    return save_image(path, image, params, fmt)


def save_png(path: str | os.PathLike, image: np.ndarray, params: dict) -> Path:
    """Write one image as PNG (whatever the suffix says) with ``params`` in an iTXt chunk."""
    return save_image(path, image, params, fmt="PNG")


def _xmp_packet(params_json: str, prompt: str) -> bytes:
    """An XMP packet holding the parameters (and the prompt as dc:description)."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:iaprt="{XMP_NS}" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/">'
        f"<iaprt:params>{escape(params_json)}</iaprt:params>"
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(prompt)}</rdf:li>'
        "</rdf:Alt></dc:description>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def read_params(path: str | os.PathLike) -> dict:
    """The generation parameters stored in an image written by :func:`save_image`."""
    from xml.sax.saxutils import unescape

    with Image.open(path) as im:
        if PARAMS_KEY in getattr(im, "text", {}):
            return json.loads(im.text[PARAMS_KEY])
        xmp = im.info.get("xmp", b"")
    xmp = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
    m = _XMP_PARAMS.search(xmp)
    if m is None:
        raise InputError(f"{path} carries no iap-rt parameters")
    return json.loads(unescape(m.group(1)))
