"""Scenes of the toy world: one or two filled shapes on a plain background, their combos, the
held-out split, and how a scene is drawn.

A scene is described by a *combo*, a hashable tuple ``(layout, *objects)`` with objects
``(colour, shape)``:

- one object: ``("left", ("red", "circle"))``; layout is the position (left, right, top,
  bottom, centre) and the image is one shape drawn by :mod:`iap_rt.train.toy.shapes`;
- two objects: ``("h", A, B)`` = A to the left of B, ``("v", A, B)`` = A above B. The two
  objects always differ in colour. ``A`` is the left (top) one, so the combo is the same
  whichever object a caption names first ("A left of B" = "B right of A").

Held out of every training split (what evaluation prompts use):

- one object: 24 of the 120 (colour, shape, position) combinations, one position per
  (colour, shape), so that every attribute pair still occurs in training;
- two objects: 96 of the 480 *(unordered object pair, axis)* units (20 %): for a held-out unit
  neither "X left of Y" nor "Y left of X" (say) is ever drawn in training, although X and Y
  each appear in training on both axes, in both slots, next to many others, and the pair
  appears on the other axis. Generalising needs composition of objects and relation.

Styles: ``flat`` (filled shapes on light grey) and ``outline`` (coloured outlines on a dark
background), the "visibly different style" of the plug-in experiment.

numpy + PIL only (no torch).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from iap_rt.train.toy import shapes

COLOURS, SHAPES, POSITIONS = shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS
AXES = ("h", "v")
LAYOUTS = POSITIONS + AXES  # the checker's layout classes
STYLES = ("flat", "outline")
OBJECTS = tuple(itertools.product(COLOURS, SHAPES))  # 24 (colour, shape) objects
IMAGE_SIZE = shapes.IMAGE_SIZE  # 32
SUPERSAMPLE = shapes.SUPERSAMPLE
N_HELDOUT_UNITS = 96

# two-object geometry (pixels of a 32-pixel image)
PAIR_RADIUS = (4.0, 5.2)  # half-extent of each shape (one object: shapes.RADIUS)
MARGIN = 1.0  # free pixels between a shape and the image border
GAP = 2.0  # free pixels between the two shapes along the axis
MAX_SKEW = 0.4  # |offset across the axis| <= MAX_SKEW * distance along it (axis unambiguous)
DARK_BACKGROUND = (20, 60)  # outline style


def two_object_combos() -> list[tuple]:
    """Every two-object combo ``(axis, A, B)`` (A, B of different colours), fixed order."""
    return [
        (axis, a, b)
        for axis in AXES
        for a in OBJECTS
        for b in OBJECTS
        if a[0] != b[0]
    ]  # fmt: skip


def one_object_combos() -> list[tuple]:
    """Every one-object combo ``(position, (colour, shape))``, colour-major (the evaluation's
    prompt and seed of a combo depend on its index here)."""
    return [(p, (c, s)) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]


def all_combos() -> list[tuple]:
    return one_object_combos() + two_object_combos()


def heldout_units(split_seed: int = 0) -> list[tuple]:
    """The 96 held-out ``(axis, X, Y)`` units (X before Y in :data:`OBJECTS` order).

    Greedy over a seeded order of the 240 unordered pairs of different colours: a pair is taken
    while neither object is already in 9 held-out units; axes alternate (48 each). At most one
    axis of a pair is held out, so every pair still co-occurs in training."""
    rng = np.random.default_rng([split_seed, 11])
    pairs = [(x, y) for x, y in itertools.combinations(OBJECTS, 2) if x[0] != y[0]]
    count = dict.fromkeys(OBJECTS, 0)
    units = []
    for i in rng.permutation(len(pairs)):
        x, y = pairs[i]
        if count[x] < 9 and count[y] < 9:
            units.append((AXES[len(units) % 2], x, y))
            count[x] += 1
            count[y] += 1
        if len(units) == N_HELDOUT_UNITS:
            break
    order = {p: i for i, p in enumerate(pairs)}
    return sorted(units, key=lambda u: (AXES.index(u[0]), order[(u[1], u[2])]))


def unit_of(combo: tuple) -> tuple:
    """The ``(axis, X, Y)`` unit a two-object combo belongs to."""
    axis, a, b = combo
    x, y = sorted((a, b), key=OBJECTS.index)
    return (axis, x, y)


def heldout_one_object(split_seed: int = 0) -> list[tuple]:
    """The 24 held-out one-object combos (20 % of 120), in :func:`one_object_combos` order.

    One position per (colour, shape) pair: ``pos = (colour_rank + shape_rank) mod 5`` over
    seeded orderings of the three attribute lists. For a fixed colour the 4 shapes hold out
    4 distinct positions; for a fixed shape the 6 colours hold out each position at most
    twice, so every attribute pair still occurs in training.
    """
    rng = np.random.default_rng([split_seed, 7])
    cr = {c: int(i) for i, c in zip(rng.permutation(len(COLOURS)), COLOURS)}
    sr = {s: int(i) for i, s in zip(rng.permutation(len(SHAPES)), SHAPES)}
    pos = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))]
    held = {(pos[(cr[c] + sr[s]) % len(POSITIONS)], (c, s)) for c in COLOURS for s in SHAPES}
    return [combo for combo in one_object_combos() if combo in held]


def heldout_combos(split_seed: int = 0) -> list[tuple]:
    """Held-out combos: the 24 one-object ones, then both orders of every held-out unit."""
    one = heldout_one_object(split_seed)
    units = set(heldout_units(split_seed))
    return one + [c for c in two_object_combos() if unit_of(c) in units]


def train_combos(split_seed: int = 0, kind: str = "all") -> list[tuple]:
    """Combos training images are drawn from (``kind``: one, two or all)."""
    held = set(heldout_combos(split_seed))
    pool = {"one": one_object_combos, "two": two_object_combos, "all": all_combos}[kind]()
    return [c for c in pool if c not in held]


def n_objects(combo: tuple) -> int:
    return len(combo) - 1


# ---- geometry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float  # centre, pixels of a 32-pixel image
    cy: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    combo: tuple
    objects: tuple[Obj, ...]  # in combo order (A, B)
    background: tuple[int, int, int]
    style: str = "flat"


def _rgb(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(shapes.RGB[colour])
    jit = rng.integers(-shapes.COLOUR_JITTER, shapes.COLOUR_JITTER + 1, 3)
    return tuple(int(v) for v in np.clip(base + jit, 0, 255))


def _background(style: str, rng: np.random.Generator) -> tuple[int, int, int]:
    lo, hi = shapes.BACKGROUND if style == "flat" else DARK_BACKGROUND
    g = rng.integers(lo, hi + 1)
    return tuple(int(v) for v in np.clip(g + rng.integers(-4, 5, 3), 0, 255))


def _pair_geometry(rng: np.random.Generator) -> tuple[float, float, float, float, float, float]:
    """(ra, rb, along_a, along_b, across_a, across_b): A before B along the axis."""
    ra, rb = rng.uniform(*PAIR_RADIUS, size=2)
    lo = max(ra + rb + GAP, 11.0)
    hi = IMAGE_SIZE - 2 * MARGIN - ra - rb
    dist = rng.uniform(lo, hi)
    start = rng.uniform(MARGIN + ra, IMAGE_SIZE - MARGIN - rb - dist)
    across_a = rng.uniform(MARGIN + ra + 1, IMAGE_SIZE - MARGIN - ra - 1)
    skew = rng.uniform(-MAX_SKEW, MAX_SKEW) * dist
    across_b = float(np.clip(across_a + skew, MARGIN + rb, IMAGE_SIZE - MARGIN - rb))
    return ra, rb, start, start + dist, across_a, across_b


def draw_scene(combo: tuple, rng: np.random.Generator, style: str = "flat") -> Scene:
    """Jittered geometry and colours of one image of ``combo``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    layout = combo[0]
    if n_objects(combo) == 1:
        (colour, shape) = combo[1]
        s = shapes.draw_sample(colour, shape, layout, rng)
        objs = (Obj(colour, shape, s.cx, s.cy, s.radius, s.rgb),)
        bg = s.background if style == "flat" else _background(style, rng)
        return Scene(combo, objs, bg, style)
    ra, rb, pa, pb, qa, qb = _pair_geometry(rng)
    (ca, sa), (cb, sb) = combo[1], combo[2]
    if layout == "h":
        geo = ((pa, qa, ra), (pb, qb, rb))
    else:
        geo = ((qa, pa, ra), (qb, pb, rb))
    objs = tuple(
        Obj(c, s, float(x), float(y), float(r), _rgb(c, rng))
        for (c, s), (x, y, r) in zip(((ca, sa), (cb, sb)), geo)
    )
    return Scene(combo, objs, _background(style, rng), style)


# ---- rendering --------------------------------------------------------------------------------
def _outline_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.2 * r  # circumradius of an upward equilateral triangle, centroid at (cx, cy)
        return [(cx, cy - R), (cx + 0.866 * R, cy + 0.5 * R), (cx - 0.866 * R, cy + 0.5 * R)]
    a, w = 1.05 * r, 0.36 * r  # cross: 12 corners, clockwise from the top arm
    return [
        (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
        (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
        (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
    ]  # fmt: skip


def _draw(d: ImageDraw.ImageDraw, o: Obj, k: float, style: str) -> None:
    cx, cy, r = o.cx * k, o.cy * k, o.radius * k
    if style == "flat":
        if o.shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=o.rgb)
        elif o.shape == "cross":
            a, w = 1.05 * r, 0.36 * r
            d.rectangle((cx - a, cy - w, cx + a, cy + w), fill=o.rgb)
            d.rectangle((cx - w, cy - a, cx + w, cy + a), fill=o.rgb)
        elif o.shape == "square":
            h = 0.9 * r
            d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=o.rgb)
        else:
            d.polygon(_outline_polygon(o.shape, cx, cy, r), fill=o.rgb)
        return
    width = max(1, round(max(1.4, 0.34 * o.radius) * k))  # outline style
    if o.shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=o.rgb, width=width)
    else:
        pts = _outline_polygon(o.shape, cx, cy, r)
        d.polygon(pts, outline=o.rgb, width=width)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 image of ``scene`` (geometry scales with size / 32)."""
    if scene.style == "flat" and len(scene.objects) == 1:
        o = scene.objects[0]  # one shape: exactly shapes.render's image
        s = shapes.Sample(o.colour, o.shape, scene.combo[0], o.cx, o.cy, o.radius, o.rgb,
                      scene.background)  # fmt: skip
        return shapes.render(s, size)
    k = SUPERSAMPLE * size / IMAGE_SIZE
    big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, scene.background)
    d = ImageDraw.Draw(big)
    for o in scene.objects:
        _draw(d, o, k, scene.style)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.uint8)


def make_image(combo: tuple, rng: np.random.Generator, style: str = "flat") -> np.ndarray:
    return render(draw_scene(combo, rng, style))


# ---- combos <-> JSON ---------------------------------------------------------------------------
def combo_to_json(combo: tuple) -> dict:
    return {"layout": combo[0], "objects": [list(o) for o in combo[1:]]}


def combo_from_json(rec: dict) -> tuple:
    return (rec["layout"], *(tuple(o) for o in rec["objects"]))
