"""The toy world generator: deterministic, held-out split, independent captions, JSONL format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from iap_rt.train.toy import data as d


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "data"
    meta = d.write_dataset(out, n=300, seed=3, n_test=48)
    return out, meta


def test_heldout_is_a_fifth_and_compositional():
    held = d.heldout_combos(0)
    assert len(held) == 24 and len(set(held)) == 24
    train = set(d.train_combos(0))
    assert len(train) == 96 and not train & set(held)
    # every attribute pair still occurs in training
    for c in d.COLOURS:
        for p in d.POSITIONS:
            assert any((c, s, p) in train for s in d.SHAPES)
        for s in d.SHAPES:
            assert any((c, s, p) in train for p in d.POSITIONS)
    for s in d.SHAPES:
        for p in d.POSITIONS:
            assert any((c, s, p) in train for c in d.COLOURS)
    assert d.heldout_combos(0) == d.heldout_combos(0)
    assert d.heldout_combos(1) != d.heldout_combos(0)


def test_generation_is_deterministic(tmp_path, small):
    out, _ = small
    again = tmp_path / "again"
    d.write_dataset(again, n=300, seed=3, n_test=48)
    for name in ("train.jsonl", "test.jsonl", "train_10pct.jsonl", "meta.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    a = d.load_images(out / "train.jsonl")
    b = d.load_images(again / "train.jsonl")
    assert np.array_equal(a, b)
    other = tmp_path / "other"
    d.write_dataset(other, n=300, seed=4, n_test=48)
    assert not np.array_equal(a, d.load_images(other / "train.jsonl"))


def test_jsonl_format_and_splits(small):
    out, meta = small
    rows = d.read_jsonl(out / "train.jsonl")
    test = d.read_jsonl(out / "test.jsonl")
    assert len(rows) == 300 and len(test) == 48
    held = {tuple(c) for c in meta["heldout"]}
    for r in rows + test:
        assert {"image", "zh", "en", "colour", "shape", "position", "split"} <= set(r)
        assert (out / r["image"]).is_file()  # relative to the JSONL file
        combo = (r["colour"], r["shape"], r["position"])
        assert (combo in held) == (r["split"] == "test")
    img = d.load_images(out / "train.jsonl", rows[:2])
    assert img.shape == (2, 32, 32, 3) and img.dtype == np.uint8
    # subsets are nested prefixes of train.jsonl
    sizes = []
    for f in d.FRACTIONS:
        sub = d.read_jsonl(out / d.fraction_name(f))
        assert sub == rows[: len(sub)]
        sizes.append(len(sub))
    assert sizes == sorted(sizes) and sizes[-1] == 30
    json.loads((out / "meta.json").read_text("utf-8"))


def test_captions_differ_and_vary():
    rng = np.random.default_rng(0)
    combo = ("orange", "circle", "left")
    en = {d.caption_en(*combo, rng) for _ in range(200)}
    zh = {d.caption_zh(*combo, rng) for _ in range(200)}
    assert len(en) > 20 and len(zh) > 20
    assert all(c.isascii() for c in en) and not any(c.isascii() for c in zh)
    # word order: English mostly names the place last, Chinese mostly first
    en_last = np.mean([c.rstrip().endswith(("left", "left side")) for c in en])
    zh_first = np.mean([c.startswith(("左", "在左", "画面左")) for c in zh])
    assert en_last > 0.5 and zh_first > 0.5
    # every caption names the three attributes in its own words
    for c in en:
        assert "orange" in c and "left" in c and any(s in c for s in d.EN_SHAPE["circle"])
    for c in zh:
        assert any(s in c for s in ("橙", "橘")) and "左" in c and "圆" in c


def test_images_show_the_attributes():
    rng = np.random.default_rng(1)
    for pos, (x0, y0) in d.CENTRES.items():
        img = d.make_image("blue", "square", pos, rng).astype(float)
        fg = img[..., 2] - img[..., 0] > 60  # blue, not grey
        ys, xs = np.nonzero(fg)
        assert abs(xs.mean() - x0) < 3 and abs(ys.mean() - y0) < 3


def test_vocabularies_cover_captions():
    rng = np.random.default_rng(2)
    words, chars = set(d.en_vocabulary()), set(d.zh_characters())
    for combo in d.all_combos():
        en = d.caption_en(*combo, rng).replace(",", " , ").replace(":", " : ").split()
        assert set(en) <= words
        assert set(d.caption_zh(*combo, rng)) <= chars


def test_toy_cli_imports_no_torch(tmp_path):
    code = (
        "import sys; from iap_rt.train.toy.cli import toy; import iap_rt.train.toy.data, "
        "iap_rt.train.toy.checker, iap_rt.train.toy.evaluate; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
