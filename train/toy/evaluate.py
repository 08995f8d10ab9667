"""Evaluation: generate images for held-out combos and score what the checker sees in them.

Image generation is a swappable ``(prompts, seeds) -> (N, 32, 32, 3) uint8`` function
(:func:`diffusers_generator` for a diffusers base and English
prompts; :func:`runtime_generator` here for exported model directories: the torch-free
runtime with several prompts per UNet batch, each image identical to it generated alone).

Prompts: for combo ``k`` (its index in :func:`scenes.all_combos`, so one-object combos keep
the one-shape world's prompts and seeds) and image ``j`` the caption comes from the dataset's caption function
with ``rng([EVAL_SEED, k, j, lang])``; the initial noise from ``seed = base_seed + 1000 k + j``,
the same for both languages.

Scores (two-object prompts). The checker reads the image as a combo (layout + objects in
slot order). The prompt's two objects are matched to the drawn ones by the assignment (same
slots or swapped) that agrees more, counting a colour as two shapes (objects are identified by
colour first: a prompt's two colours always differ), ties going to the same slots:

- ``colour`` / ``shape``: fraction of prompt objects whose matched drawn object has that
  colour / shape (order-free: an object drawn on the wrong side still counts);
- ``relation``: both objects drawn, on the prompt's axis, and the same-slot assignment agrees
  strictly more than the swapped one (the objects are in the right order);
- ``objects``: both prompt objects drawn with their colour and shape, wherever they are
  (``binding`` without the relation: the base's own relation is at chance, so this is the
  sharper measure of whether a text encoder conveys which colour goes with which shape);
- ``binding``: the drawn combo equals the prompt's (both objects right, relation right).

One-object prompts: ``colour``, ``shape``, ``position`` and ``all``, prefixed ``one_``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iap_rt.errors import InputError
from iap_rt.fileio import write_json_atomic
from iap_rt.train.toy import captions, scenes
from iap_rt.train.toy.checker import Checker

EVAL_SEED = 20261124
GenerateFn = Callable[[list[str], list[int]], np.ndarray]

LANGS = ("en", "zh")
KINDS = ("all", "one", "two")
TWO_METRICS = ("colour", "shape", "relation", "objects", "binding")
ONE_METRICS = ("one_colour", "one_shape", "one_position", "one_all")
DARK = 90  # mean corner brightness below this: the outline style's dark background


@dataclass(frozen=True)
class EvalItem:
    combo: tuple
    prompt: str
    seed: int


def eval_items(
    lang: str, combos: list[tuple], seeds_per_combo: int = 2, base_seed: int = 0
) -> list[EvalItem]:
    """One item per (combo, image index)."""
    if lang not in LANGS:
        raise InputError(f"--lang must be one of {LANGS}, got {lang!r}")
    index = {c: i for i, c in enumerate(scenes.all_combos())}
    items = []
    for combo in combos:
        k = index[combo]
        for j in range(seeds_per_combo):
            rng = np.random.default_rng([EVAL_SEED, k, j, LANGS.index(lang)])
            prompt = captions.CAPTIONS[lang](combo, rng)
            items.append(EvalItem(combo, prompt, base_seed + 1000 * k + j))
    return items


def select_combos(
    which: str = "heldout", kind: str = "all", split_seed: int = 0, limit: int | None = None
) -> list[tuple]:
    """``heldout`` / ``train`` / ``all`` combos of ``kind`` (one, two, all); ``limit``: that many
    of each kind, evenly spread over its list."""
    table = {
        "heldout": lambda: scenes.heldout_combos(split_seed),
        "train": lambda: scenes.train_combos(split_seed),
        "all": scenes.all_combos,
    }
    if which not in table:
        raise InputError(f"--combos must be one of {sorted(table)}, got {which!r}")
    if kind not in KINDS:
        raise InputError(f"--kind must be one of {KINDS}, got {kind!r}")
    combos = table[which]()
    out = []
    for n in (1, 2):
        if kind in ("all", ("one", "two")[n - 1]):
            part = [c for c in combos if scenes.n_objects(c) == n]
            if limit is not None and limit < len(part):
                idx = np.linspace(0, len(part) - 1, limit).round().astype(int)
                part = [part[i] for i in idx]
            out += part
    return out


def _matches(p: tuple, q: tuple | None) -> tuple[bool, bool]:
    """(colour equal, shape equal) of object ``p`` and drawn object ``q`` (None: not drawn)."""
    return (False, False) if q is None else (p[0] == q[0], p[1] == q[1])


def _weight(pairs: list[tuple[bool, bool]]) -> int:
    """Objects are identified by colour first (a prompt's colours always differ), then shape."""
    return sum(2 * c + s for c, s in pairs)


def judge_two(want: tuple, got: tuple) -> dict:
    """Per-object colour / shape hits (0..2), relation, objects and binding of one two-object
    image."""
    a, b = want[1], want[2]
    ga, gb = got[1], got[2] if len(got) == 3 else None
    same = [_matches(a, ga), _matches(b, gb)]
    swap = [_matches(a, gb), _matches(b, ga)]
    best = same if _weight(same) >= _weight(swap) else swap
    relation = len(got) == 3 and got[0] == want[0] and _weight(same) > _weight(swap)
    return {
        "colour": sum(m[0] for m in best),
        "shape": sum(m[1] for m in best),
        "relation": bool(relation),
        "objects": all(c and s for c, s in best),
        "binding": got == want,
    }


def score(items: list[EvalItem], preds: list[tuple]) -> dict:
    """The module docstring's scores over ``items`` given the checker's ``preds``."""
    two = [(it.combo, p) for it, p in zip(items, preds) if scenes.n_objects(it.combo) == 2]
    one = [(it.combo, p) for it, p in zip(items, preds) if scenes.n_objects(it.combo) == 1]
    res: dict = {"n": len(items), "n_two": len(two), "n_one": len(one)}
    if two:
        js = [judge_two(w, g) for w, g in two]
        res["colour"] = float(np.mean([j["colour"] for j in js]) / 2)
        res["shape"] = float(np.mean([j["shape"] for j in js]) / 2)
        res["relation"] = float(np.mean([j["relation"] for j in js]))
        res["objects"] = float(np.mean([j["objects"] for j in js]))
        res["binding"] = float(np.mean([j["binding"] for j in js]))
    if one:
        ok = np.array(
            [[g[1][0] == w[1][0], g[1][1] == w[1][1], g[0] == w[0]] for w, g in one]
        )  # (N, 3): colour, shape, position
        for i, k in enumerate(("one_colour", "one_shape", "one_position")):
            res[k] = float(ok[:, i].mean())
        res["one_all"] = float(ok.all(1).mean())
    return res


def evaluate(
    generate: GenerateFn,
    lang: str = "en",
    combos: list[tuple] | None = None,
    seeds_per_combo: int = 2,
    checker: Checker | None = None,
    base_seed: int = 0,
) -> tuple[dict, np.ndarray, list[EvalItem], list[tuple]]:
    """(scores, images, items, predicted combos) of ``generate`` on ``combos`` (default: every
    held-out combo)."""
    combos = combos if combos is not None else select_combos()
    checker = checker or Checker()
    items = eval_items(lang, combos, seeds_per_combo, base_seed)
    images = generate([it.prompt for it in items], [it.seed for it in items])
    preds = checker.predict(images)
    return score(items, preds) | {"lang": lang}, images, items, preds


def agreement(
    items: list[EvalItem],
    preds_a: list[tuple],
    preds_b: list[tuple],
    images_a: np.ndarray,
    images_b: np.ndarray,
) -> dict:
    """Same-noise comparison: fraction of images read as the same combo (all prompts and
    two-object prompts), and pixel MSE (images in [0, 1])."""
    same = [a == b for a, b in zip(preds_a, preds_b)]
    two = [s for s, it in zip(same, items) if scenes.n_objects(it.combo) == 2]
    mse = np.mean((images_a.astype(np.float64) / 255 - images_b.astype(np.float64) / 255) ** 2)
    return {
        "agreement": float(np.mean(same)),
        "agreement_two": float(np.mean(two)) if two else None,
        "pixel_mse": float(mse),
    }


def dark_fraction(images: np.ndarray) -> float:
    """Fraction of ``(N, H, W, 3)`` images whose four corners average below :data:`DARK`
    (the plug-in experiment's check that the fine-tuned style came through)."""
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(np.float64)  # (N, 4, 3)
    return float((corners.mean(axis=(1, 2)) < DARK).mean())


def grid(images: np.ndarray, cols: int, scale: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) images into one (rows*H*scale, cols*W*scale, 3) image."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    pad = np.full((rows * cols - n, h, w, 3), 255, np.uint8)
    g = np.concatenate([images, pad]).reshape(rows, cols, h, w, 3)
    g = g.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    return g.repeat(scale, 0).repeat(scale, 1)


# ---- generators: a diffusers base (torch), an exported model directory (runtime) ----------
def diffusers_generator(
    model_dir,
    steps: int = 25,
    guidance: float = 3.0,
    batch: int = 48,
    threads: int = 1,
    numpy_noise: bool = False,
) -> GenerateFn:
    """Sample a diffusers-format toy base: DDIM (eta 0), classifier-free guidance, run by the
    PyTorch twin of the runtime (:class:`iap_rt.train.torch_pipeline.TorchPipeline`) on the base's
    CLIP embeddings (``""`` as the unconditional prompt), ``batch`` prompts per UNet call.

    ``numpy_noise``: draw image noise with :func:`iap_rt.pipeline.initial_noise` (the runtime's),
    so images match :func:`runtime_generator`'s for the same seed; else torch's generator."""
    import torch

    from iap_rt.pipeline import initial_noise as noise
    from iap_rt.train.torch_pipeline import TorchPipeline
    from iap_rt.train.toy.base_model import load_base, tokenize

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


def runtime_generator(
    model_dir, steps: int = 25, guidance: float = 3.0, scheduler: str = "ddim", chunk: int = 16
) -> GenerateFn:
    """Sample an exported model directory with :meth:`iap_rt.pipeline.Pipeline.generate`
    (ONNX Runtime), ``chunk`` images per UNet batch; image noise = ``initial_noise(seed)``."""
    from iap_rt.pipeline import Pipeline, PromptRequest

    pipe = Pipeline.from_dir(model_dir, backend="ort", progress=False)
    pipe.chunk_size = chunk

    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        reqs = [PromptRequest(p, seed=s, guidance=guidance) for p, s in zip(prompts, seeds)]
        out = pipe.generate(reqs, steps=steps, scheduler=scheduler)
        return np.concatenate([r.images for r in out])  # (N, H, W, 3) uint8

    return generate


# ---- the English base's record ------------------------------------------------------------
def evaluate_base(
    base: str | os.PathLike,
    out: str | os.PathLike | None = None,
    seeds_two: int = 2,
    seeds_one: int = 4,
    steps: int = 25,
    guidance: float = 3.0,
    threads: int = 2,
) -> dict:
    """Held-out English scores of a toy base (``iap-rt toy base-eval``: diffusers sampling, the
    checker), the record ``bench/results/toy2_base.json`` holds; ``out``: write it there."""
    base = Path(base)
    gen = diffusers_generator(base, steps=steps, guidance=guidance, threads=threads)
    res_two, *_ = evaluate(gen, "en", select_combos("heldout", "two"), seeds_two)
    res_one, *_ = evaluate(gen, "en", select_combos("heldout", "one"), seeds_one)
    train = json.loads((base / "toy_base.json").read_text("utf-8"))
    record = {
        "base": str(base),
        "eval": {"combos": "heldout", "steps": steps, "guidance": guidance, "scheduler": "ddim",
                 "seeds_two": seeds_two, "seeds_one": seeds_one},  # fmt: skip
        "two_object": {k: v for k, v in res_two.items() if k not in ("lang", "n_one", "n")},
        "one_object": {k: v for k, v in res_one.items() if k not in ("lang", "n_two", "n")},
        "train": {k: train[k] for k in ("steps", "samples_seen", "train_cpu_minutes",
                                          "train_wall_minutes", "params", "torch_threads")},
        "config": train["config"],
    }  # fmt: skip
    if out is not None:
        write_json_atomic(Path(out), record)
    return record
