"""One filled shape: the attributes (colour, shape, position), their colours and geometry,
and how one shape is drawn.

A one-object scene of the toy world (:mod:`iap_rt.train.toy.scenes`) is exactly one
:class:`Sample` rendered here: a shape of one of six colours at one of five places of a 32x32
image, with size, offset, shape colour and background brightness jittered per image. Two-object
scenes reuse the colours and the background; their geometry is the scenes module's.

numpy + PIL only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

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
