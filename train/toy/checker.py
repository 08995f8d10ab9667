"""The attribute checker: which colour, shape and position a (generated) toy image shows.

A small CNN (3 conv layers + 2 dense, ~48k parameters, three heads) trained on freshly drawn
synthetic images of *all* 120 combinations with augmentations that imitate what a diffusion
sampler gets wrong (pixel noise, low-frequency blotches, blur, colour and brightness drift).
A rule-based checker (foreground hue + centroid + moments) scored 100% on clean images but
failed on noisy generated ones in the prototype, hence the learned one.

Inference is plain numpy (no torch, no onnxruntime), so ``iap-rt toy eval`` can check images
from the torch-free runtime too. The weights are one safetensors file read by a 15-line
reader; :func:`train_checker` (torch, imported inside) writes it and reports accuracy on
clean and augmented held-out synthetic images.
"""

from __future__ import annotations

import json
import os
import struct
from importlib import resources
from pathlib import Path

import numpy as np

from iap_rt.errors import ArtifactNotFoundError
from iap_rt.train.toy import data as toydata

HEADS = {"colour": toydata.COLOURS, "shape": toydata.SHAPES, "position": toydata.POSITIONS}
WIDTHS = (16, 32, 32)
HIDDEN = 64


def default_checker_path() -> Path:
    return Path(str(resources.files("iap_rt") / "data" / "toy_checker.safetensors"))


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


class Checker:
    """Classify (N, 32, 32, 3) uint8 images into colour / shape / position."""

    def __init__(self, path: str | os.PathLike | None = None):
        path = Path(path) if path is not None else default_checker_path()
        if not path.is_file():
            raise ArtifactNotFoundError(
                f"toy attribute checker {path} is missing",
                fix="iap-rt toy checker --out " + str(path),
            )
        self.w, self.meta = read_safetensors(path)

    def logits(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # (N, 3, 32, 32)
        for i in range(len(WIDTHS)):
            x = _maxpool2(_conv3x3_relu(x, self.w[f"conv{i}.weight"], self.w[f"conv{i}.bias"]))
        h = x.reshape(len(x), -1)  # (N, 32*4*4)
        h = np.maximum(h @ self.w["fc.weight"].T + self.w["fc.bias"], 0.0)
        out, start = {}, 0
        z = h @ self.w["head.weight"].T + self.w["head.bias"]  # (N, 15)
        for name, labels in HEADS.items():
            out[name] = z[:, start : start + len(labels)]
            start += len(labels)
        return out

    def predict(self, images: np.ndarray, batch: int = 256) -> list[dict[str, str]]:
        """One ``{"colour", "shape", "position"}`` dict per image."""
        preds: list[dict[str, str]] = []
        for i in range(0, len(images), batch):
            lg = self.logits(images[i : i + batch])
            idx = {k: v.argmax(1) for k, v in lg.items()}
            for j in range(len(next(iter(idx.values())))):
                preds.append({k: HEADS[k][int(idx[k][j])] for k in HEADS})
        return preds


# ---- training (torch) ----------------------------------------------------------------------------
def synthetic_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clean images over all 120 combinations + (n, 3) label indices."""
    combos = toydata.all_combos()
    order = toydata.balanced_combos(combos, n, np.random.default_rng([seed, 0]))
    imgs = np.empty((n, toydata.IMAGE_SIZE, toydata.IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((n, 3), np.int64)
    for i, (c, s, p) in enumerate(order):
        imgs[i] = toydata.make_image(c, s, p, np.random.default_rng([seed, 1, i]))
        labels[i] = (
            toydata.COLOURS.index(c),
            toydata.SHAPES.index(s),
            toydata.POSITIONS.index(p),
        )
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


def train_checker(
    out: str | os.PathLike,
    n_train: int = 24000,
    n_test: int = 2400,
    epochs: int = 6,
    seed: int = 0,
    progress=print,
) -> dict:
    """Train the checker, write ``out`` (safetensors), return accuracies on held-out images."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from iap_rt.fileio import atomic_path

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    xtr, ytr = synthetic_set(n_train, seed)
    xte, yte = synthetic_set(n_test, seed + 1000)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    xtr_t, xte_t = to_t(xtr), to_t(xte)
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)

    layers: list[nn.Module] = []
    c_in = 3
    for w in WIDTHS:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = w
    feat = c_in * (toydata.IMAGE_SIZE // 2 ** len(WIDTHS)) ** 2
    n_out = sum(len(v) for v in HEADS.values())
    net = nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(feat, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_out)
    )
    sizes = [len(v) for v in HEADS.values()]
    steps = epochs * (n_train // 128)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (128,), generator=gen)
        xb = degrade(xtr_t[idx], gen) if step % 4 else xtr_t[idx]
        z = net(xb).split(sizes, dim=1)
        loss = sum(nn.functional.cross_entropy(z[k], ytr_t[idx, k]) for k in range(3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            progress(f"checker step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()

    def acc(x):
        with torch.no_grad():
            z = net(x).split(sizes, dim=1)
        pred = torch.stack([zz.argmax(1) for zz in z], 1)
        ok = pred == yte_t
        res = {k: float(ok[:, i].float().mean()) for i, k in enumerate(HEADS)}
        res["all"] = float(ok.all(1).float().mean())
        return res

    result = {
        "clean": acc(xte_t),
        "degraded": acc(degrade(xte_t, torch.Generator().manual_seed(1))),
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
    np_pred = Checker(out).predict(xte[:256])
    with torch.no_grad():
        z = net(xte_t[:256]).split(sizes, dim=1)
    agree = np.mean(
        [
            all(p[k] == HEADS[k][int(z[i][j].argmax())] for i, k in enumerate(HEADS))
            for j, p in enumerate(np_pred)
        ]
    )
    result["numpy_torch_agreement"] = float(agree)
    progress(f"checker accuracy: {json.dumps(result)}")
    return result
