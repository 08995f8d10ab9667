"""The attribute checkers' building blocks: a numpy safetensors reader, numpy convolution and
pooling, and the augmentations that imitate what a diffusion sampler gets wrong.

World v1's checker (three heads) was trained and read with these; world v2's
(:mod:`iap_rt.train.toy2.checker`) still is.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# ---- numpy inference -----------------------------------------------------------------------------
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of a safetensors file, with numpy only."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        arr = np.frombuffer(raw[base + a : base + b], dtype=_DTYPES[v["dtype"]])
        out[k] = arr.reshape(v["shape"]).copy()
    return out, meta


def _conv3x3_relu(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, O, H, W), zero padding 1, then ReLU."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # (N,C,H,W,3,3)
    y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True) + b[None, :, None, None]
    return np.maximum(y, 0.0)


def _maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def degrade(x, gen):
    """Augment a float (N, 3, 32, 32) batch in [0, 1] the way samplers go wrong (torch)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    # colour drift of the whole image and brightness / contrast
    x = x * u(0.85, 1.15, 1, 1, 1) + u(-0.08, 0.08, 3, 1, 1)
    # blur half of the images
    blur = torch.rand(n, generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        xb = F.conv2d(
            F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3
        )
        x = x.clone()
        x[blur] = xb
    # low-frequency blotches (8x8 noise upsampled) and pixel noise
    blot = torch.randn(n, 3, 8, 8, generator=gen) * u(0.0, 0.08, 1, 1, 1)
    x = x + F.interpolate(blot, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=gen) * u(0.0, 0.08, 1, 1, 1)
    return x.clamp(0, 1)
