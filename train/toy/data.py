"""The toy world's dataset files (``iap-rt toy data``): images + JSONL that ``iap-rt train``
reads, and the readers of those files.

:func:`write_dataset` writes::

    images/train_000000.png ...   32x32 RGB PNGs
    train.jsonl                   training combos only (= train_100pct.jsonl)
    train_1pct.jsonl ...          nested prefixes of train.jsonl (1 %, 5 %, 10 %, 100 %)
    test.jsonl                    images of held-out combos (checker tests, validation)
    meta.json                     seed, counts, held-out combos, vocabularies

Each JSONL row: ``{"image", "zh", "en", "layout", "objects", "style", "split"}`` (``objects``:
``[[colour, shape], ...]`` in combo order, see :mod:`iap_rt.train.toy.scenes`), with the image
path relative to the JSONL file. A quarter of the images (``one_fraction``) show one object;
the rest two. Sample ``i`` of a stream depends only on ``(seed, stream, i)``. ``meta.json``
names the world ``toy2``, version 2 (the one- and two-object world, which was ``iap-rt toy2``
while a one-shape world was ``iap-rt toy``; its version-1 data had no ``world`` key).

numpy + PIL only (no torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from iap_rt.fileio import ensure_dir, write_json_atomic, write_text_atomic
from iap_rt.train.toy import captions, scenes

DATA_VERSION = 2
FRACTIONS = (0.01, 0.05, 0.10, 1.0)
ONE_FRACTION = 0.25


def fraction_name(fraction: float) -> str:
    """0.05 -> ``"5pct"`` (the grid's name of a training subset)."""
    return f"{round(fraction * 100):d}pct"


def mixed_combos(
    split: str, n: int, rng: np.random.Generator, split_seed: int, one_fraction: float
) -> list[tuple]:
    """``n`` combos of ``split`` (train / test): one-object with probability ``one_fraction``,
    each kind in balanced shuffled rounds (every prefix is balanced)."""
    if split == "train":
        one, two = scenes.train_combos(split_seed, "one"), scenes.train_combos(split_seed, "two")
    else:
        held = scenes.heldout_combos(split_seed)
        one = [c for c in held if scenes.n_objects(c) == 1]
        two = [c for c in held if scenes.n_objects(c) == 2]
    is_one = rng.random(n) < one_fraction
    ones = balanced_combos(one, int(is_one.sum()), rng)
    twos = balanced_combos(two, n - int(is_one.sum()), rng)
    it_one, it_two = iter(ones), iter(twos)
    return [next(it_one) if k else next(it_two) for k in is_one]


def sample_rows(
    combos: list[tuple], seed: int, stream: int, style: str = "flat"
) -> list[tuple[dict, np.ndarray]]:
    """``(row, image)`` per combo; sample ``i`` draws from ``rng([seed, stream, 1, i])``."""
    out = []
    for i, combo in enumerate(combos):
        rng = np.random.default_rng([seed, stream, 1, i])
        img = scenes.make_image(combo, rng, style)
        row = {
            "en": captions.caption_en(combo, rng),
            "zh": captions.caption_zh(combo, rng),
            **scenes.combo_to_json(combo),
            "style": style,
        }
        out.append((row, img))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_dataset(
    out: str | os.PathLike,
    n: int = 40000,
    seed: int = 0,
    split_seed: int = 0,
    n_test: int | None = None,
    fractions: tuple[float, ...] = FRACTIONS,
    one_fraction: float = ONE_FRACTION,
    style: str = "flat",
) -> dict:
    """Write the dataset to ``out`` (layout in the module docstring); returns meta.json."""
    out = ensure_dir(out)
    ensure_dir(out / "images")
    n_test = n // 10 if n_test is None else n_test
    rows_by_split: dict[str, list[dict]] = {}
    for stream, (split, count) in enumerate((("train", n), ("test", n_test))):
        rng = np.random.default_rng([seed, stream, 0])
        combos = mixed_combos(split, count, rng, split_seed, one_fraction)
        rows = []
        for i, (row, img) in enumerate(sample_rows(combos, seed, stream, style)):
            rel = f"images/{split}_{i:06d}.png"
            Image.fromarray(img).save(out / rel, optimize=False)
            rows.append({"image": rel, **row, "split": split})
        rows_by_split[split] = rows
        _write_jsonl(out / f"{split}.jsonl", rows)
    subsets = {}
    for f in fractions:
        k = max(1, round(f * n))
        name = f"train_{fraction_name(f)}.jsonl"
        _write_jsonl(out / name, rows_by_split["train"][:k])
        subsets[name] = k
    meta = {
        "version": DATA_VERSION,
        "world": "toy2",
        "seed": seed,
        "split_seed": split_seed,
        "style": style,
        "image_size": scenes.IMAGE_SIZE,
        "n_train": n,
        "n_test": n_test,
        "one_fraction": one_fraction,
        "subsets": subsets,
        "heldout": [scenes.combo_to_json(c) for c in scenes.heldout_combos(split_seed)],
        "en_vocabulary": captions.en_vocabulary(),
        "zh_characters": captions.zh_characters(),
    }
    write_json_atomic(out / "meta.json", meta)
    return meta


def balanced_combos(combos: list, n: int, rng: np.random.Generator) -> list:
    """``n`` combinations: consecutive shuffled rounds of ``combos`` (every prefix balanced)."""
    out: list = []
    while len(out) < n:
        out.extend(combos[i] for i in rng.permutation(len(combos)))
    return out[:n]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_images(path: str | os.PathLike, rows: list[dict] | None = None) -> np.ndarray:
    """All images of a JSONL file as one (N, H, W, 3) uint8 array."""
    path = Path(path)
    rows = read_jsonl(path) if rows is None else rows
    imgs = [np.asarray(Image.open(path.parent / r["image"]).convert("RGB")) for r in rows]
    return np.stack(imgs)


def row_combo(row: dict) -> tuple:
    return scenes.combo_from_json(row)
