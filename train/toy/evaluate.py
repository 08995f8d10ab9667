"""``iap-rt toy eval``: generate for every held-out combination and check what was drawn.

The "generate images" step is a swappable function ``(prompts, seeds) -> (N, 32, 32, 3)
uint8``: :func:`diffusers_generator` samples a diffusers-format base (English prompts) with the
PyTorch twin of the runtime (:mod:`iap_rt.train.reference`, DDIM, classifier-free guidance); a
generator over the torch-free runtime pipeline (exported model directories, Chinese prompts)
plugs into the same :func:`evaluate` / :func:`agreement`.

Prompts: for combination ``k`` and seed index ``j`` the caption is drawn with the dataset's
own caption functions from ``rng([EVAL_SEED, k, j, lang])``, so the seeds of one combination
use different templates and synonyms. The initial noise of image ``(k, j)`` depends only on
``seed = base_seed + 1000 * k + j`` (identical for both languages: agreement compares images
from the same noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from iap_rt.errors import InputError
from iap_rt.train.toy import data as toydata
from iap_rt.train.toy.checker import HEADS, Checker

EVAL_SEED = 20261124
LANGS = ("en", "zh")

GenerateFn = Callable[[list[str], list[int]], np.ndarray]


@dataclass(frozen=True)
class EvalItem:
    combo: tuple[str, str, str]
    prompt: str
    seed: int


def eval_items(
    lang: str,
    combos: list[tuple[str, str, str]],
    seeds_per_combo: int = 4,
    base_seed: int = 0,
) -> list[EvalItem]:
    if lang not in LANGS:
        raise InputError(f"--lang must be one of {LANGS}, got {lang!r}")
    caption = toydata.caption_en if lang == "en" else toydata.caption_zh
    items = []
    for combo in combos:
        kk = toydata.all_combos().index(combo)
        for j in range(seeds_per_combo):
            rng = np.random.default_rng([EVAL_SEED, kk, j, LANGS.index(lang)])
            items.append(EvalItem(combo, caption(*combo, rng), base_seed + 1000 * kk + j))
    return items


def select_combos(
    which: str, split_seed: int = 0, limit: int | None = None
) -> list[tuple[str, str, str]]:
    """The ``heldout``, ``train`` or ``all`` combinations; ``limit``: that many, evenly spread."""
    table = {
        "heldout": toydata.heldout_combos,
        "train": toydata.train_combos,
        "all": lambda s: toydata.all_combos(),
    }
    if which not in table:
        raise InputError(f"--combos must be one of {sorted(table)}, got {which!r}")
    combos = table[which](split_seed)
    if limit is not None and limit < len(combos):
        idx = np.linspace(0, len(combos) - 1, limit).round().astype(int)
        combos = [combos[i] for i in idx]
    return combos


def score(items: list[EvalItem], images: np.ndarray, checker: Checker) -> dict:
    """Per-attribute and all-three accuracy of ``images`` against the items' combinations."""
    preds = checker.predict(images)
    ok = np.array(
        [[p[a] == it.combo[i] for i, a in enumerate(HEADS)] for p, it in zip(preds, items)]
    )  # (N, 3) bool
    res = {a: float(ok[:, i].mean()) for i, a in enumerate(HEADS)}
    res["all"] = float(ok.all(1).mean())
    res["n"] = len(items)
    return res | {"_preds": preds}


def evaluate(
    generate: GenerateFn,
    lang: str = "en",
    combos: list[tuple[str, str, str]] | None = None,
    seeds_per_combo: int = 4,
    checker: Checker | None = None,
    base_seed: int = 0,
) -> tuple[dict, np.ndarray, list[EvalItem]]:
    """(scores, images, items) for ``generate`` on ``combos`` (default: the held-out ones)."""
    combos = combos if combos is not None else toydata.heldout_combos()
    checker = checker or Checker()
    items = eval_items(lang, combos, seeds_per_combo, base_seed)
    images = generate([it.prompt for it in items], [it.seed for it in items])
    res = score(items, images, checker)
    res.pop("_preds")
    return res | {"lang": lang}, images, items


def agreement(images_a: np.ndarray, images_b: np.ndarray, checker: Checker | None = None) -> dict:
    """Same-noise comparison: fraction with all three classified attributes equal; pixel MSE."""
    checker = checker or Checker()
    pa, pb = checker.predict(images_a), checker.predict(images_b)
    same = np.mean([a == b for a, b in zip(pa, pb)])
    mse = np.mean((images_a.astype(np.float64) / 255 - images_b.astype(np.float64) / 255) ** 2)
    return {"agreement": float(same), "pixel_mse": float(mse), "n": len(pa)}


def grid(images: np.ndarray, cols: int, scale: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) images into one (rows*H*scale, cols*W*scale, 3) image."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    pad = np.full((rows * cols - n, h, w, 3), 255, np.uint8)
    g = np.concatenate([images, pad]).reshape(rows, cols, h, w, 3)
    g = g.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    return g.repeat(scale, 0).repeat(scale, 1)


# ---- the diffusers (torch) generator -------------------------------------------------------------
def diffusers_generator(
    model_dir,
    steps: int = 25,
    guidance: float = 3.0,
    batch: int = 48,
    threads: int = 1,
    numpy_noise: bool = False,
) -> GenerateFn:
    """Sample a diffusers-format toy base: DDIM (eta 0), classifier-free guidance, run by the
    PyTorch twin of the runtime (:class:`iap_rt.train.reference.TorchPipeline`) on the base's
    CLIP embeddings (``""`` as the unconditional prompt), ``batch`` prompts per UNet call.

    ``numpy_noise``: draw image noise with :func:`iap_rt.pipeline.initial_noise` (the runtime's),
    so images match :func:`runtime_generator`'s for the same seed; else torch's generator."""
    import torch

    from iap_rt.pipeline import initial_noise as noise
    from iap_rt.train.reference import TorchPipeline
    from iap_rt.train.toy.base import load_base, tokenize

    torch.set_num_threads(threads)
    tok, text, unet, vae, sched_cfg = load_base(model_dir)
    ref = TorchPipeline(unet, vae, sched_cfg, default_scheduler="ddim")
    channels = unet.config.in_channels
    size = unet.config.sample_size

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        out = []
        uncond = text(tokenize(tok, [""])).last_hidden_state  # (1, S, D)
        for i in range(0, len(prompts), batch):
            p, s = prompts[i : i + batch], seeds[i : i + batch]
            cond = text(tokenize(tok, p)).last_hidden_state  # (b, S, D)
            ctx = torch.cat([uncond.expand_as(cond), cond])  # (2b, S, D)
            if numpy_noise:
                z = torch.from_numpy(
                    np.concatenate([noise(x, 1, (channels, size, size)) for x in s])
                )
            else:
                z = torch.stack(
                    [
                        torch.randn(
                            channels, size, size, generator=torch.Generator().manual_seed(x)
                        )
                        for x in s
                    ]
                )  # (b, C, h, w)
            z = ref.denoise(ctx, z, steps, guidance, "ddim")  # (b, C, h, w)
            x = ref.decode(z)  # (b, 3, H, W) in [-1, 1]
            img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    return generate


# ---- the runtime (torch-free) generator ----------------------------------------------------------
def runtime_generator(
    model_dir, steps: int = 25, guidance: float = 3.0, scheduler: str = "ddim"
) -> GenerateFn:
    """Sample an exported iap-rt model directory with :class:`iap_rt.pipeline.Pipeline` (ONNX
    Runtime), one prompt at a time; image noise = ``initial_noise(seed)`` like the English side
    of :func:`diffusers_generator` with ``numpy_noise=True``."""
    from iap_rt.pipeline import Pipeline

    pipe = Pipeline.from_dir(model_dir, backend="ort", progress=False)

    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return np.concatenate(
            [
                pipe(p, steps=steps, guidance=guidance, seed=s, scheduler=scheduler).images
                for p, s in zip(prompts, seeds)
            ]
        )  # (N, H, W, 3) uint8

    return generate
