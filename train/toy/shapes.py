"""The toy world: seeded 32x32 images of one filled shape, with independent EN and ZH captions.

Attributes: shape {circle, square, triangle, cross}, colour {red, green, blue, yellow, purple,
orange}, position {left, right, top, bottom, centre}; 4 x 6 x 5 = 120 combinations. Size,
offset, shape colour and background brightness are jittered per image.

About 20% of the combinations (24) are *held out* of every training split: for every
(colour, shape) pair exactly one position is held out, arranged so that every (colour,
position) and (shape, position) pair still occurs in training. Generalising to a held-out
combination therefore needs composition, not memorisation.

English and Chinese captions are written independently from the attributes, each with its
own templates, synonyms and word order (Chinese mostly puts the position first, English
last), so neither language is a word-for-word translation of the other.

What world v2 (:mod:`iap_rt.train.toy`) takes from here: the attributes, their colours and
geometry, one shape's drawing, the one-object captions and the held-out combinations.

numpy + PIL only (no torch).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
POSITIONS = ("left", "right", "top", "bottom", "centre")

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down (anti-aliased edges)

# Base RGB of each colour; every image jitters each channel by up to +-COLOUR_JITTER.
RGB = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 25),
    "purple": (140, 50, 195),
    "orange": (245, 135, 20),
}
COLOUR_JITTER = 18
BACKGROUND = (205, 245)  # plain grey background, brightness drawn per image
# Shape centre per position in a 32-pixel image (x, y); offsets jitter by +-OFFSET_JITTER.
CENTRES = {
    "left": (9, 16),
    "right": (23, 16),
    "top": (16, 9),
    "bottom": (16, 23),
    "centre": (16, 16),
}
OFFSET_JITTER = 2.0
RADIUS = (4.5, 6.5)  # half-extent of the shape in pixels (32-pixel image)

# ---- captions --------------------------------------------------------------------------------
EN_COLOUR = {
    "red": ("red", "scarlet"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
}
EN_SHAPE = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
EN_WHERE = {  # prepositional phrases
    "left": ("on the left", "at the left", "on the left side", "to the left"),
    "right": ("on the right", "at the right", "on the right side", "to the right"),
    "top": ("at the top", "on top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
EN_PLACE = {  # noun phrases
    "left": ("left side", "left"),
    "right": ("right side", "right"),
    "top": ("top", "upper part"),
    "bottom": ("bottom", "lower part"),
    "centre": ("centre", "center", "middle"),
}
EN_TEMPLATES = (
    "{a} {c} {s} {w}",
    "{c} {s}, {p}",
    "{w}, {a} {c} {s}",
    "there is {a} {c} {s} {w}",
    "{a} {s} in {c} {w}",
    "{c} {s} {w}",
    "{p}: {c} {s}",
)

ZH_COLOUR = {  # (long form, short form(s)); the short form is bound to the noun ("红圆")
    "red": (("红色",), ("红",)),
    "green": (("绿色",), ("绿",)),
    "blue": (("蓝色",), ("蓝",)),
    "yellow": (("黄色",), ("黄",)),
    "purple": (("紫色",), ("紫",)),
    "orange": (("橙色", "橘色"), ("橙",)),
}
ZH_SHAPE = {
    "circle": ("圆", "圆形", "圆圈"),
    "square": ("正方形", "方块", "方形"),
    "triangle": ("三角形", "三角"),
    "cross": ("十字", "十字形", "加号"),
}
ZH_PLACE = {
    "left": ("左边", "左侧", "左面"),
    "right": ("右边", "右侧", "右面"),
    "top": ("上面", "上方", "顶部"),
    "bottom": ("下面", "下方", "底部"),
    "centre": ("中间", "中央", "正中间"),
}
ZH_TEMPLATES = (
    "{p}有一个{cs}",
    "{cs}在{p}",
    "一个{cs}，位于{p}",
    "在{p}的{cs}",
    "{p}：{cs}",
    "画面{p}是一个{cs}",
    "{p}画着一个{cs}",
)


def all_combos() -> list[tuple[str, str, str]]:
    """Every (colour, shape, position) combination, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, POSITIONS))


def heldout_combos(split_seed: int = 0) -> list[tuple[str, str, str]]:
    """The 24 held-out (colour, shape, position) combinations (20% of 120).

    One position per (colour, shape) pair: ``pos = (colour_rank + shape_rank) mod 5`` over
    seeded orderings of the three attribute lists. For a fixed colour the 4 shapes hold out
    4 distinct positions; for a fixed shape the 6 colours hold out each position at most
    twice, so every attribute pair still occurs in training.
    """
    rng = np.random.default_rng([split_seed, 7])
    cr = {c: int(i) for i, c in zip(rng.permutation(len(COLOURS)), COLOURS)}
    sr = {s: int(i) for i, s in zip(rng.permutation(len(SHAPES)), SHAPES)}
    pos = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))]
    out = [(c, s, pos[(cr[c] + sr[s]) % len(POSITIONS)]) for c in COLOURS for s in SHAPES]
    return sorted(out, key=all_combos().index)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_en(colour: str, shape: str, position: str, rng: np.random.Generator) -> str:
    """One English caption (template, synonyms and word order drawn from ``rng``)."""
    t = EN_TEMPLATES[rng.integers(len(EN_TEMPLATES))]
    c = EN_COLOUR[colour][rng.integers(len(EN_COLOUR[colour]))]
    s = EN_SHAPE[shape][rng.integers(len(EN_SHAPE[shape]))]
    w = EN_WHERE[position][rng.integers(len(EN_WHERE[position]))]
    p = EN_PLACE[position][rng.integers(len(EN_PLACE[position]))]
    a = _a(s) if t.startswith("{a} {s}") else _a(c)
    return t.format(a=a, c=c, s=s, w=w, p=p)


def caption_zh(colour: str, shape: str, position: str, rng: np.random.Generator) -> str:
    """One Chinese caption, drawn independently of the English one."""
    t = ZH_TEMPLATES[rng.integers(len(ZH_TEMPLATES))]
    longs, shorts = ZH_COLOUR[colour]
    s = ZH_SHAPE[shape][rng.integers(len(ZH_SHAPE[shape]))]
    form = rng.integers(3)
    if form == 0:  # 红色的圆
        cs = f"{longs[rng.integers(len(longs))]}的{s}"
    elif form == 1:  # 红色圆形
        cs = f"{longs[rng.integers(len(longs))]}{s}"
    else:  # 红圆
        cs = f"{shorts[rng.integers(len(shorts))]}{s}"
    p = ZH_PLACE[position][rng.integers(len(ZH_PLACE[position]))]
    return t.format(p=p, cs=cs)


def en_vocabulary() -> list[str]:
    """Every English word (and punctuation token) a caption can contain, sorted."""
    words: set[str] = set()
    for table in (EN_COLOUR, EN_SHAPE, EN_WHERE, EN_PLACE):
        for phrases in table.values():
            for ph in phrases:
                words.update(ph.split())
    for t in EN_TEMPLATES:
        for tok in t.replace(",", " , ").replace(":", " : ").split():
            if not tok.startswith("{"):
                words.add(tok)
    words.update({"a", "an"})
    return sorted(words)


def zh_characters() -> list[str]:
    """Every character a Chinese caption can contain, sorted."""
    chars: set[str] = set()
    for table in (ZH_SHAPE, ZH_PLACE):
        for phrases in table.values():
            chars.update("".join(phrases))
    for longs, shorts in ZH_COLOUR.values():
        chars.update("".join(longs + shorts))
    for t in ZH_TEMPLATES:
        chars.update(t.replace("{p}", "").replace("{cs}", ""))
    chars.add("的")
    return sorted(chars)


# ---- images ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    colour: str
    shape: str
    position: str
    cx: float  # shape centre, pixels of a 32-pixel image
    cy: float
    radius: float
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]


def draw_sample(colour: str, shape: str, position: str, rng: np.random.Generator) -> Sample:
    """Draw the jittered geometry and colours of one image."""
    x0, y0 = CENTRES[position]
    cx = x0 + rng.uniform(-OFFSET_JITTER, OFFSET_JITTER)
    cy = y0 + rng.uniform(-OFFSET_JITTER, OFFSET_JITTER)
    radius = rng.uniform(*RADIUS)
    base = np.array(RGB[colour])
    rgb = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    g = rng.integers(BACKGROUND[0], BACKGROUND[1] + 1)
    bg = np.clip(g + rng.integers(-4, 5, 3), 0, 255)
    return Sample(
        colour,
        shape,
        position,
        float(cx),
        float(cy),
        float(radius),
        tuple(int(v) for v in rgb),
        tuple(int(v) for v in bg),
    )


def render(s: Sample, size: int = IMAGE_SIZE) -> np.ndarray:
    """The (size, size, 3) uint8 image of ``s`` (geometry scales with ``size``/32)."""
    k = SUPERSAMPLE * size / IMAGE_SIZE
    big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, s.background)
    d = ImageDraw.Draw(big)
    cx, cy, r = s.cx * k, s.cy * k, s.radius * k
    if s.shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=s.rgb)
    elif s.shape == "square":
        h = 0.9 * r
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=s.rgb)
    elif s.shape == "triangle":
        R = 1.2 * r  # circumradius of an upward equilateral triangle, centroid at (cx, cy)
        pts = [(cx, cy - R), (cx - 0.866 * R, cy + 0.5 * R), (cx + 0.866 * R, cy + 0.5 * R)]
        d.polygon(pts, fill=s.rgb)
    elif s.shape == "cross":
        a, w = 1.05 * r, 0.36 * r
        d.rectangle((cx - a, cy - w, cx + a, cy + w), fill=s.rgb)
        d.rectangle((cx - w, cy - a, cx + w, cy + a), fill=s.rgb)
    else:
        raise ValueError(f"unknown shape {s.shape!r}")
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.uint8)


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
