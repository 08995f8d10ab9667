"""Captions of a scene's combo in English and Chinese, written independently, and the words and
characters they can contain.

One object: a template with the colour, shape and place (English mostly names the place last,
Chinese mostly first; synonyms per language; Chinese colours bind to the noun in three forms:
红色的圆, 红色圆形, 红圆). Two objects: each language draws, on its own,

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

from iap_rt.train.toy.scenes import n_objects

# ---- one object -------------------------------------------------------------------------------
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
EN_ONE_TEMPLATES = (
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
ZH_ONE_TEMPLATES = (
    "{p}有一个{cs}",
    "{cs}在{p}",
    "一个{cs}，位于{p}",
    "在{p}的{cs}",
    "{p}：{cs}",
    "画面{p}是一个{cs}",
    "{p}画着一个{cs}",
)


def article(word: str) -> str:
    """The English indefinite article of ``word`` (a / an)."""
    return "an" if word[0] in "aeiou" else "a"


def caption_one_en(colour: str, shape: str, position: str, rng: np.random.Generator) -> str:
    """One English caption of one shape (template, synonyms and word order from ``rng``)."""
    t = EN_ONE_TEMPLATES[rng.integers(len(EN_ONE_TEMPLATES))]
    c = EN_COLOUR[colour][rng.integers(len(EN_COLOUR[colour]))]
    s = EN_SHAPE[shape][rng.integers(len(EN_SHAPE[shape]))]
    w = EN_WHERE[position][rng.integers(len(EN_WHERE[position]))]
    p = EN_PLACE[position][rng.integers(len(EN_PLACE[position]))]
    a = article(s) if t.startswith("{a} {s}") else article(c)
    return t.format(a=a, c=c, s=s, w=w, p=p)


def caption_one_zh(colour: str, shape: str, position: str, rng: np.random.Generator) -> str:
    """One Chinese caption of one shape, drawn independently of the English one."""
    t = ZH_ONE_TEMPLATES[rng.integers(len(ZH_ONE_TEMPLATES))]
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


# ---- two objects ------------------------------------------------------------------------------
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
EN_TWO_TEMPLATES = (
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
ZH_TWO_TEMPLATES = (
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
    c = _pick(rng, EN_COLOUR[colour])
    s = _pick(rng, EN_SHAPE[shape])
    if rng.integers(4) == 0:
        return f"{article(s)} {s} in {c}"
    return f"{article(c)} {c} {s}"


def zh_object(obj: tuple, rng: np.random.Generator, article: bool = True) -> str:
    colour, shape = obj
    longs, shorts = ZH_COLOUR[colour]
    s = _pick(rng, ZH_SHAPE[shape])
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
        return caption_one_en(colour, shape, combo[0], rng)
    first, second, rel = _named(combo, rng)
    t = _pick(rng, EN_TWO_TEMPLATES)
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
        return caption_one_zh(colour, shape, combo[0], rng)
    first, second, rel = _named(combo, rng)
    t = _pick(rng, ZH_TWO_TEMPLATES)
    r = rng.integers(3)  # one synonym set for both relation words of a caption
    return t.format(
        F=zh_object(first, rng, article="有{F}" in t),
        S=zh_object(second, rng, article=False),
        rel=ZH_REL[rel][r],
        inv=ZH_REL[INVERSE[rel]][r],
    )


CAPTIONS = {"en": caption_en, "zh": caption_zh}


def en_vocabulary() -> list[str]:
    """Every English word (and punctuation token) a caption can contain, sorted."""
    words: set[str] = {"a", "an", "in"}
    for table in (EN_COLOUR, EN_SHAPE, EN_WHERE, EN_PLACE, EN_REL, EN_ITS):
        for phrases in table.values():
            for ph in phrases:
                words.update(ph.split())
    for t in EN_ONE_TEMPLATES + EN_TWO_TEMPLATES:
        for tok in t.replace(",", " , ").replace(":", " : ").split():
            if not tok.startswith("{"):
                words.add(tok)
    return sorted(words)


def zh_characters() -> list[str]:
    """Every character a Chinese caption can contain, sorted."""
    chars: set[str] = set("一个的")
    for table in (ZH_SHAPE, ZH_PLACE, ZH_REL):
        for phrases in table.values():
            chars.update("".join(phrases))
    for longs, shorts in ZH_COLOUR.values():
        chars.update("".join(longs + shorts))
    for t in ZH_ONE_TEMPLATES + ZH_TWO_TEMPLATES:
        for field in ("{p}", "{cs}", "{F}", "{S}", "{rel}", "{inv}"):
            t = t.replace(field, "")
        chars.update(t)
    return sorted(chars)


# the shortest words that name a colour or a shape in every Chinese caption form above
ZH_WORLD_WORDS = ("红", "绿", "蓝", "黄", "紫", "橙", "橘", "圆", "方", "三角", "十字", "加号")
ZH_EXAMPLES = (
    "左边有一个红色的圆",
    "左边是红色的圆形，右边是蓝色的十字",
    "绿色三角形在黄色方块的上面",
)


def caption_world() -> dict:
    """What a model of this world declares in its manifest (``caption_world``, read by
    :func:`iap_rt.requests.notice`): what it draws, the words its captions name colours and
    shapes with, and prompts to try."""
    return {
        "draws": "one or two coloured shapes (circles, squares, triangles and crosses in red, "
        "green, blue, yellow, purple or orange) on a 32x32 canvas, left, right, above or below "
        "each other",
        "words": list(ZH_WORLD_WORDS),
        "examples": list(ZH_EXAMPLES),
    }
