"""The checker: which combo (layout + one or two objects) a toy image shows.

A small CNN (3 conv layers + 2 dense, ~190k parameters) with five heads that read a scene in
its canonical form (:mod:`iap_rt.train.toy.scenes`):

    layout    left, right, top, bottom, centre (one object) | h, v (two objects)
    colour_a, shape_a    the object (one object) or the left / top one (two objects)
    colour_b, shape_b    the right / bottom one (two objects; not trained on one-object images)

so "which object is where" is part of the answer, not a post-hoc rule. Trained on freshly
drawn synthetic images of *all* combos (held-out ones too: the checker is a measuring
instrument, not a model under test), in both styles, with augmentations that imitate
what a diffusion sampler gets wrong (:func:`degrade`).

Inference is plain numpy (a safetensors reader and conv / pool blocks here), so ``iap-rt toy eval``
can check images of the torch-free runtime; :func:`train_checker` imports torch inside.
"""

from __future__ import annotations

import json
import os
import struct
from importlib import resources
from pathlib import Path

import numpy as np

from iap_rt.errors import ArtifactNotFoundError
from iap_rt.train.toy import scenes

HEADS = {
    "layout": scenes.LAYOUTS,
    "colour_a": scenes.COLOURS,
    "shape_a": scenes.SHAPES,
    "colour_b": scenes.COLOURS,
    "shape_b": scenes.SHAPES,
}
WIDTHS = (32, 64, 64)
HIDDEN = 128


def default_checker_path() -> Path:
    return Path(str(resources.files("iap_rt") / "data" / "toy_checker.safetensors"))


def labels_of(combo: tuple) -> tuple[int, int, int, int, int]:
    """Head indices of ``combo`` (-1 for the b heads of a one-object combo)."""
    layout, a = combo[0], combo[1]
    b = combo[2] if len(combo) == 3 else None
    return (
        scenes.LAYOUTS.index(layout),
        scenes.COLOURS.index(a[0]),
        scenes.SHAPES.index(a[1]),
        scenes.COLOURS.index(b[0]) if b else -1,
        scenes.SHAPES.index(b[1]) if b else -1,
    )


def combo_of(idx: tuple[int, int, int, int, int]) -> tuple:
    """The combo the five predicted head indices describe."""
    layout = scenes.LAYOUTS[idx[0]]
    a = (scenes.COLOURS[idx[1]], scenes.SHAPES[idx[2]])
    if layout in scenes.AXES:
        return (layout, a, (scenes.COLOURS[idx[3]], scenes.SHAPES[idx[4]]))
    return (layout, a)


# ---- numpy inference blocks------------------------------------------------------------------------
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


def conv3x3_relu(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, O, H, W), zero padding 1, then ReLU."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # (N,C,H,W,3,3)
    y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True) + b[None, :, None, None]
    return np.maximum(y, 0.0)


def maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


class Checker:
    """Classify ``(N, 32, 32, 3)`` uint8 images into combos."""

    def __init__(self, path: str | os.PathLike | None = None):
        path = Path(path) if path is not None else default_checker_path()
        if not path.is_file():
            raise ArtifactNotFoundError(
                f"toy checker {path} is missing", fix="iap-rt toy checker --out " + str(path)
            )
        self.w, self.meta = read_safetensors(path)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """``(N, 27)`` logits of the five heads, concatenated in :data:`HEADS` order."""
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # (N, 3, 32, 32)
        for i in range(len(WIDTHS)):
            x = maxpool2(conv3x3_relu(x, self.w[f"conv{i}.weight"], self.w[f"conv{i}.bias"]))
        h = x.reshape(len(x), -1)  # (N, 64*4*4)
        h = np.maximum(h @ self.w["fc.weight"].T + self.w["fc.bias"], 0.0)
        return h @ self.w["head.weight"].T + self.w["head.bias"]

    def predict(self, images: np.ndarray, batch: int = 256) -> list[tuple]:
        """One combo per image."""
        out: list[tuple] = []
        sizes = np.cumsum([0] + [len(v) for v in HEADS.values()])
        for i in range(0, len(images), batch):
            z = self.logits(images[i : i + batch])
            idx = np.stack([z[:, a:b].argmax(1) for a, b in zip(sizes[:-1], sizes[1:])], 1)
            out += [combo_of(tuple(int(v) for v in row)) for row in idx]
        return out


# ---- training (torch) ----------------------------------------------------------------------------
def synthetic_set(
    n: int, seed: int, outline_fraction: float = 0.3, one_fraction: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clean images over all combos, both styles, + ``(n, 5)`` head labels."""
    rng = np.random.default_rng([seed, 0])
    ones, twos = scenes.one_object_combos(), scenes.two_object_combos()
    imgs = np.empty((n, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((n, 5), np.int64)
    for i in range(n):
        pool = ones if rng.random() < one_fraction else twos
        combo = pool[rng.integers(len(pool))]
        style = "outline" if rng.random() < outline_fraction else "flat"
        imgs[i] = scenes.make_image(combo, np.random.default_rng([seed, 1, i]), style)
        labels[i] = labels_of(combo)
    return imgs, labels


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


def _accuracy(pred, y) -> dict:
    """Per-head accuracy (b heads on two-object images only) and exact-combo accuracy."""
    two = y[:, 3] >= 0
    res = {}
    for i, k in enumerate(HEADS):
        rows = two if i >= 3 else np.ones(len(y), bool)
        res[k] = float((pred[rows, i] == y[rows, i]).mean())
    ok_a = (pred[:, :3] == y[:, :3]).all(1)
    ok_b = np.where(two, (pred[:, 3:] == y[:, 3:]).all(1), True)
    res["all"] = float((ok_a & ok_b).mean())
    res["all_two"] = float((ok_a & ok_b)[two].mean())
    res["all_one"] = float((ok_a & ok_b)[~two].mean())
    return res


def train_checker(
    out: str | os.PathLike,
    n_train: int = 48000,
    n_test: int = 4000,
    epochs: int = 8,
    seed: int = 0,
    threads: int = 1,
    progress=print,
) -> dict:
    """Train the checker, write ``out`` (safetensors), return accuracies on fresh images."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from iap_rt.fileio import atomic_path

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    xtr, ytr = synthetic_set(n_train, seed)
    xte, yte = synthetic_set(n_test, seed + 1000)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    xtr_t, xte_t, ytr_t = to_t(xtr), to_t(xte), torch.from_numpy(ytr)
    layers: list[nn.Module] = []
    c_in = 3
    for w in WIDTHS:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = w
    feat = c_in * (scenes.IMAGE_SIZE // 2 ** len(WIDTHS)) ** 2
    sizes = [len(v) for v in HEADS.values()]
    net = nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(feat, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, sum(sizes))
    )
    steps = epochs * (n_train // 128)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (128,), generator=gen)
        xb = degrade(xtr_t[idx], gen) if step % 4 else xtr_t[idx]
        z = net(xb).split(sizes, dim=1)
        yb = ytr_t[idx]
        loss = sum(nn.functional.cross_entropy(z[k], yb[:, k], ignore_index=-1) for k in range(5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            progress(f"checker step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()

    def predict(x) -> np.ndarray:
        with torch.no_grad():
            z = net(x).split(sizes, dim=1)
        return torch.stack([zz.argmax(1) for zz in z], 1).numpy()

    result = {
        "clean": _accuracy(predict(xte_t), yte),
        "degraded": _accuracy(predict(degrade(xte_t, torch.Generator().manual_seed(1))), yte),
    }
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    fcs = [m for m in net if isinstance(m, nn.Linear)]
    tensors = {}
    for i, m in enumerate(convs):
        tensors[f"conv{i}.weight"], tensors[f"conv{i}.bias"] = m.weight, m.bias
    tensors["fc.weight"], tensors["fc.bias"] = fcs[0].weight, fcs[0].bias
    tensors["head.weight"], tensors["head.bias"] = fcs[1].weight, fcs[1].bias
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {"accuracy": json.dumps(result), "n_train": str(n_train), "seed": str(seed)}
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    # the numpy checker must agree with torch
    np_pred = Checker(out).predict(xte[:512])
    torch_pred = [combo_of(tuple(int(v) for v in r)) for r in predict(xte_t[:512])]
    result["numpy_torch_agreement"] = float(np.mean([a == b for a, b in zip(np_pred, torch_pred)]))
    with atomic_path(out) as tmp:  # again, with the agreement in the metadata
        save_file(tensors, str(tmp), metadata=meta | {"accuracy": json.dumps(result)})
    progress(f"checker accuracy: {json.dumps(result)}")
    return result
