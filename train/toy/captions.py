"""Toy world v2 captions: English and Chinese written independently from a scene's combo.

One-object combos use toy world v1's caption functions unchanged (so v1 prompts still mean
what they meant). For two objects each language draws, on its own:

- which object it names first (the relation word follows: "A left of B" or "B right of A"),
- a template (each language has one where the *reference* object comes first: "to the left
  of a blue square there is a red circle", "蓝色正方形的左边有一个红色的圆"; Chinese also
  puts the relation phrase at the end "红圆，蓝方块在它的右边" or before both objects
  "左边是红圆，右边是蓝方块"),
- synonyms of colours, shapes and relation words.

So neither caption is a word-for-word translation of the other and word orders differ.
"""

from __future__ import annotations

import numpy as np

from iap_rt.train.toy import shapes as v1
from iap_rt.train.toy.scenes import n_objects

# relation of the first-named object to the second, per axis and order of naming
RELATIONS = ("left", "right", "above", "below")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}

EN_REL = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
EN_ITS = {  # "{F} with {S} {its}": where S is, seen from F
    "left": ("to its left", "on its left"),
    "right": ("to its right", "on its right"),
    "above": ("above it",),
    "below": ("below it", "under it"),
}
EN_TEMPLATES = (
    "{F} {rel} {S}",
    "{F} is {rel} {S}",
    "there is {F} {rel} {S}",
    "{rel} {S} there is {F}",  # the reference object first
    "{F} with {S} {its}",
)

ZH_REL = {
    "left": ("左边", "左侧", "左面"),
    "right": ("右边", "右侧", "右面"),
    "above": ("上面", "上方", "上边"),
    "below": ("下面", "下方", "下边"),
}
ZH_TEMPLATES = (
    "{F}在{S}的{rel}",
    "{F}位于{S}{rel}",
    "{S}的{rel}有{F}",  # the reference object first
    "在{S}{rel}的是{F}",  # the reference object first
    "{F}，{S}在它的{inv}",  # the relation phrase last, about the second object
    "{rel}是{F}，{inv}是{S}",  # both places first
)


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _named(combo: tuple, rng: np.random.Generator) -> tuple[tuple, tuple, str]:
    """(first-named object, second, relation of first to second), order drawn from ``rng``."""
    axis, a, b = combo
    if rng.integers(2) == 0:
        return a, b, "left" if axis == "h" else "above"
    return b, a, "right" if axis == "h" else "below"


def en_object(obj: tuple, rng: np.random.Generator) -> str:
    colour, shape = obj
    c = _pick(rng, v1.EN_COLOUR[colour])
    s = _pick(rng, v1.EN_SHAPE[shape])
    if rng.integers(4) == 0:
        return f"{v1._a(s)} {s} in {c}"
    return f"{v1._a(c)} {c} {s}"


def zh_object(obj: tuple, rng: np.random.Generator, article: bool = True) -> str:
    colour, shape = obj
    longs, shorts = v1.ZH_COLOUR[colour]
    s = _pick(rng, v1.ZH_SHAPE[shape])
    form = rng.integers(3)
    if form == 0:  # 红色的圆
        cs = f"{_pick(rng, longs)}的{s}"
    elif form == 1:  # 红色圆形
        cs = f"{_pick(rng, longs)}{s}"
    else:  # 红圆
        cs = f"{_pick(rng, shorts)}{s}"
    return ("一个" + cs) if article and rng.integers(2) == 0 else cs


def caption_en(combo: tuple, rng: np.random.Generator) -> str:
    """One English caption of ``combo`` (template, naming order, synonyms from ``rng``)."""
    if n_objects(combo) == 1:
        (colour, shape) = combo[1]
        return v1.caption_en(colour, shape, combo[0], rng)
    first, second, rel = _named(combo, rng)
    t = _pick(rng, EN_TEMPLATES)
    return t.format(
        F=en_object(first, rng),
        S=en_object(second, rng),
        rel=_pick(rng, EN_REL[rel]),
        its=_pick(rng, EN_ITS[INVERSE[rel]]),
    )


def caption_zh(combo: tuple, rng: np.random.Generator) -> str:
    """One Chinese caption of ``combo``, drawn independently of the English one."""
    if n_objects(combo) == 1:
        (colour, shape) = combo[1]
        return v1.caption_zh(colour, shape, combo[0], rng)
    first, second, rel = _named(combo, rng)
    t = _pick(rng, ZH_TEMPLATES)
    r = rng.integers(3)  # one synonym set for both relation words of a caption
    return t.format(
        F=zh_object(first, rng, article="有{F}" in t),
        S=zh_object(second, rng, article=False),
        rel=ZH_REL[rel][r],
        inv=ZH_REL[INVERSE[rel]][r],
    )


CAPTIONS = {"en": caption_en, "zh": caption_zh}


def en_vocabulary() -> list[str]:
    """Every English word a v1 or v2 caption can contain, sorted."""
    words = set(v1.en_vocabulary())
    for table in (EN_REL, EN_ITS):
        for phrases in table.values():
            for ph in phrases:
                words.update(ph.split())
    for t in EN_TEMPLATES:
        words.update(tok for tok in t.split() if not tok.startswith("{"))
    words.update({"a", "an", "in"})
    return sorted(words)


def zh_characters() -> list[str]:
    """Every character a v1 or v2 Chinese caption can contain, sorted."""
    chars = set(v1.zh_characters())
    for phrases in ZH_REL.values():
        chars.update("".join(phrases))
    for t in ZH_TEMPLATES:
        for field in ("{F}", "{S}", "{rel}", "{inv}"):
            t = t.replace(field, "")
        chars.update(t)
    chars.update("一个的")
    return sorted(chars)
