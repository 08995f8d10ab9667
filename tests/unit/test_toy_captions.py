"""Captions mean their combo in both languages, written independently.

Each language gets a small rule-based reader written here from the templates' *meaning*
(who is named first, which relation word, whose side it describes); every caption must read
back as its combo.
"""

from __future__ import annotations

import re

import numpy as np

from iap_rt.train.toy import captions as cap
from iap_rt.train.toy import scenes as sc
from iap_rt.train.toy.base_model import MAX_LENGTH

EN_COLOUR = {w: c for c, ws in cap.EN_COLOUR.items() for w in ws}
EN_SHAPE = {w: s for s, ws in cap.EN_SHAPE.items() for w in ws}
EN_REL = {
    "to the left of": "left", "left of": "left", "on the left of": "left",
    "to the right of": "right", "right of": "right", "on the right of": "right",
    "above": "above", "over": "above", "on top of": "above",
    "below": "below", "under": "below", "beneath": "below",
}  # fmt: skip
EN_ITS = {"to its left": "left", "on its left": "left", "to its right": "right",
          "on its right": "right", "above it": "above", "below it": "below",
          "under it": "below"}  # fmt: skip
ZH_COLOUR = {"红": "red", "绿": "green", "蓝": "blue", "黄": "yellow", "紫": "purple",
             "橙": "orange", "橘": "orange"}  # fmt: skip
ZH_SHAPE = {
    "圆": "circle",
    "正方": "square",
    "方": "square",
    "三角": "triangle",
    "十字": "cross",
    "加号": "cross",
}
ZH_PLACE = {"左": "left", "右": "right", "上": "above", "下": "below"}


def canonical(first, second, rel) -> tuple:
    """Combo of "first is ``rel`` of second"."""
    return {
        "left": ("h", first, second),
        "right": ("h", second, first),
        "above": ("v", first, second),
        "below": ("v", second, first),
    }[rel]


def en_objects(text: str) -> list[tuple]:
    """(colour, shape) of each object in order of mention ("a red disc", "a box in red")."""
    shape_re = "|".join(sorted(EN_SHAPE, key=len, reverse=True))
    colour_re = "|".join(EN_COLOUR)
    out = []
    for m in re.finditer(
        rf"(?:({colour_re}) ({shape_re}))|(?:({shape_re}) in ({colour_re}))", text
    ):
        c, s = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        out.append((EN_COLOUR[c], EN_SHAPE[s]))
    return out


def read_en(text: str) -> tuple:
    objs = en_objects(text)
    assert len(objs) == 2, text
    for phrase, rel in EN_ITS.items():
        if text.endswith(phrase):  # "F with S to its right": S is right of F
            return canonical(objs[1], objs[0], rel)
    for phrase in sorted(EN_REL, key=len, reverse=True):
        if text.startswith(phrase + " "):  # "left of S there is F"
            return canonical(objs[1], objs[0], EN_REL[phrase])
    for phrase in sorted(EN_REL, key=len, reverse=True):
        if f" {phrase} " in text:
            return canonical(objs[0], objs[1], EN_REL[phrase])
    raise AssertionError(text)


def zh_objects(text: str) -> list[tuple]:
    out = []
    for m in re.finditer(r"([红绿蓝黄紫橙橘])色?的?(圆|正方|方|三角|十字|加号)", text):
        out.append((ZH_COLOUR[m.group(1)], ZH_SHAPE[m.group(2)]))
    return out


def read_zh(text: str) -> tuple:
    objs = zh_objects(text)
    assert len(objs) == 2, text
    places = [ZH_PLACE[ch] for ch in re.findall(r"([左右上下])(?:边|侧|面|方)", text)]
    if "它" in text:  # "F，S在它的右边": S is right of F
        return canonical(objs[1], objs[0], places[0])
    if re.match(r"[左右上下](边|侧|面|方)是", text):  # "左边是F，右边是S"
        return canonical(objs[0], objs[1], places[0])
    if text.startswith("在") or "有" in text:  # "在S左边的是F", "S的左边有F"
        return canonical(objs[1], objs[0], places[0])
    return canonical(objs[0], objs[1], places[0])  # "F在S的左边", "F位于S左侧"


def test_two_object_captions_read_back_as_their_combo():
    combos = sc.two_object_combos()
    rng = np.random.default_rng(0)
    for i in range(3000):
        combo = combos[rng.integers(len(combos))]
        r = np.random.default_rng([1, i])
        en, zh = cap.caption_en(combo, r), cap.caption_zh(combo, r)
        assert read_en(en) == combo, (combo, en)
        assert read_zh(zh) == combo, (combo, zh)


def test_languages_choose_naming_order_and_templates_independently():
    combo = ("h", ("red", "circle"), ("blue", "square"))
    pairs = set()
    for i in range(400):
        r = np.random.default_rng([2, i])
        en, zh = cap.caption_en(combo, r), cap.caption_zh(combo, r)
        en_first_red = en_objects(en)[0][0] == "red"
        zh_first_red = zh_objects(zh)[0][0] == "red"
        pairs.add((en_first_red, zh_first_red))
    assert pairs == {(True, True), (True, False), (False, True), (False, False)}
    # every template of each language is used; the reference-first ones included
    seen_en, seen_zh = set(), set()
    for i in range(600):
        r = np.random.default_rng([3, i])
        seen_en.add(cap.caption_en(combo, r).split()[0])
        seen_zh.add(cap.caption_zh(combo, r)[0])
    assert {"to", "left", "on", "right", "there"} & seen_en
    assert "在" in seen_zh and "左" in seen_zh


def test_one_object_combos_get_the_one_shape_captions():
    for k, combo in enumerate(sc.one_object_combos()[::11]):
        (c, s) = combo[1]
        a = cap.caption_en(combo, np.random.default_rng(k))
        b = cap.caption_one_en(c, s, combo[0], np.random.default_rng(k))
        assert a == b
        a = cap.caption_zh(combo, np.random.default_rng(k))
        b = cap.caption_one_zh(c, s, combo[0], np.random.default_rng(k))
        assert a == b


def test_one_shape_captions_differ_and_vary():
    rng = np.random.default_rng(0)
    combo = ("orange", "circle", "left")
    en = {cap.caption_one_en(*combo, rng) for _ in range(200)}
    zh = {cap.caption_one_zh(*combo, rng) for _ in range(200)}
    assert len(en) > 20 and len(zh) > 20
    assert all(c.isascii() for c in en) and not any(c.isascii() for c in zh)
    # word order: English mostly names the place last, Chinese mostly first
    en_last = np.mean([c.rstrip().endswith(("left", "left side")) for c in en])
    zh_first = np.mean([c.startswith(("左", "在左", "画面左")) for c in zh])
    assert en_last > 0.5 and zh_first > 0.5
    # every caption names the three attributes in its own words
    for c in en:
        assert "orange" in c and "left" in c and any(s in c for s in cap.EN_SHAPE["circle"])
    for c in zh:
        assert any(s in c for s in ("橙", "橘")) and "左" in c and "圆" in c


def test_vocabularies_cover_every_caption_and_fit_the_token_budget():
    words, chars = set(cap.en_vocabulary()), set(cap.zh_characters())
    longest = 0
    for i, combo in enumerate(sc.all_combos()):
        for j in range(6):
            r = np.random.default_rng([4, i, j])
            en = cap.caption_en(combo, r)
            toks = en.replace(",", " , ").replace(":", " : ").split()
            assert set(toks) <= words, en
            longest = max(longest, len(toks))
            assert set(cap.caption_zh(combo, r)) <= chars
    assert longest + 2 <= MAX_LENGTH  # BOS + words + EOS


def test_every_chinese_caption_names_a_word_of_the_declared_world():
    """The embedded model's manifest declares this world (prompts without any of its words get
    a notice): every caption the world writes contains one, and the manifest holds it."""
    import json

    from iap_rt.modeldir import default_model_dir
    from iap_rt.train.toy.captions import caption_world, caption_zh
    from iap_rt.train.toy.scenes import all_combos

    world = caption_world()
    rng = np.random.default_rng(0)
    for combo in all_combos():
        for _ in range(3):
            text = caption_zh(combo, rng)
            assert any(w in text for w in world["words"]), text
    manifest = json.loads((default_model_dir() / "manifest.json").read_text("utf-8"))
    assert manifest["caption_world"] == world
