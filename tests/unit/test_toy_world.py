"""The toy world: the held-out split is compositional, scenes show what their combo says."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from iap_rt.train.toy import data as d
from iap_rt.train.toy import scenes as sc
from iap_rt.train.toy import shapes


def test_one_object_heldout_is_a_fifth_and_compositional():
    held = sc.heldout_one_object(0)
    assert len(held) == 24 and len(set(held)) == 24
    train = set(sc.train_combos(0, "one"))
    assert len(train) == 96 and not train & set(held)
    # every attribute pair still occurs in training
    for c in sc.COLOURS:
        for p in sc.POSITIONS:
            assert any((p, (c, s)) in train for s in sc.SHAPES)
        for s in sc.SHAPES:
            assert any((p, (c, s)) in train for p in sc.POSITIONS)
    for s in sc.SHAPES:
        for p in sc.POSITIONS:
            assert any((p, (c, s)) in train for c in sc.COLOURS)
    assert sc.heldout_one_object(1) != held
    assert sc.heldout_combos(0)[:24] == held


def test_one_shape_images_show_the_shape_where_its_position_says():
    rng = np.random.default_rng(1)
    for pos, (x0, y0) in shapes.CENTRES.items():
        img = sc.make_image((pos, ("blue", "square")), rng).astype(float)
        fg = img[..., 2] - img[..., 0] > 60  # blue, not grey
        ys, xs = np.nonzero(fg)
        assert abs(xs.mean() - x0) < 3 and abs(ys.mean() - y0) < 3


def test_heldout_units_are_a_fifth_balanced_and_one_axis_per_pair():
    units = sc.heldout_units(0)
    assert len(units) == len(set(units)) == 96
    assert sum(u[0] == "h" for u in units) == 48
    pairs = [(x, y) for _, x, y in units]
    assert len(set(pairs)) == 96  # never both axes of one pair
    for obj in sc.OBJECTS:
        assert 1 <= sum(obj in (x, y) for x, y in pairs) <= 9
    assert all(x[0] != y[0] for x, y in pairs)
    assert sc.heldout_units(0) == units and sc.heldout_units(1) != units


def test_training_keeps_every_object_slot_axis_and_pair():
    held = set(sc.heldout_combos(0))
    train = sc.train_combos(0)
    assert len(held) == 24 + 192 and not held & set(train)
    assert len(train) == 96 + 768
    two = [c for c in train if sc.n_objects(c) == 2]
    for obj, axis in itertools.product(sc.OBJECTS, sc.AXES):
        assert any(c[0] == axis and c[1] == obj for c in two)  # left / top slot
        assert any(c[0] == axis and c[2] == obj for c in two)  # right / bottom slot
    seen = {frozenset(c[1:]) for c in two}
    assert all(frozenset((x, y)) in seen for x, y in itertools.combinations(sc.OBJECTS, 2)
               if x[0] != y[0])  # fmt: skip
    # a held-out unit is held out in both orders
    for axis, x, y in sc.heldout_units(0):
        assert (axis, x, y) in held and (axis, y, x) in held


def test_two_object_combos_differ_in_colour():
    combos = sc.two_object_combos()
    assert len(combos) == 2 * 24 * 20
    assert all(c[1][0] != c[2][0] for c in combos)


@pytest.mark.parametrize("axis", sc.AXES)
def test_pair_geometry_puts_a_before_b_on_the_axis(axis):
    combo = (axis, ("red", "circle"), ("blue", "cross"))
    for i in range(300):
        s = sc.draw_scene(combo, np.random.default_rng(i))
        a, b = s.objects
        along = (b.cx - a.cx) if axis == "h" else (b.cy - a.cy)
        across = (b.cy - a.cy) if axis == "h" else (b.cx - a.cx)
        assert along >= a.radius + b.radius + sc.GAP - 1e-9
        assert abs(across) <= sc.MAX_SKEW * along + 1e-9
        for o in s.objects:
            assert sc.MARGIN <= o.cx - o.radius and o.cx + o.radius <= sc.IMAGE_SIZE - sc.MARGIN
            assert sc.MARGIN <= o.cy - o.radius and o.cy + o.radius <= sc.IMAGE_SIZE - sc.MARGIN


def test_one_object_flat_images_are_one_drawn_shape():
    for i, combo in enumerate(sc.one_object_combos()[::7]):
        (c, s) = combo[1]
        a = sc.make_image(combo, np.random.default_rng([5, i]))
        b = shapes.render(shapes.draw_sample(c, s, combo[0], np.random.default_rng([5, i])))
        assert np.array_equal(a, b)


def _colour_at(img: np.ndarray, x: float, y: float) -> str:
    px = img[int(round(y - 0.5)), int(round(x - 0.5))].astype(float)
    return min(shapes.RGB, key=lambda c: np.sum((px - np.array(shapes.RGB[c])) ** 2))


def test_images_show_the_objects_where_the_scene_says():
    rng = np.random.default_rng(0)
    combos = sc.two_object_combos()
    for i in range(200):
        combo = combos[rng.integers(len(combos))]
        combo = (combo[0], (combo[1][0], "circle"), (combo[2][0], "square"))  # filled centres
        s = sc.draw_scene(combo, np.random.default_rng(i))
        img = sc.render(s)
        for o in s.objects:
            assert _colour_at(img, o.cx, o.cy) == o.colour
        corners = img[[0, 0, -1, -1], [0, -1, 0, -1]].astype(float)
        assert corners.min() > 150  # flat style: light background


def test_outline_style_is_dark_with_hollow_shapes():
    combo = ("h", ("red", "circle"), ("yellow", "square"))
    s = sc.draw_scene(combo, np.random.default_rng(3), style="outline")
    img = sc.render(s)
    assert img[0, 0].max() < 80
    for o in s.objects:  # the centre is background, the rim has the colour
        assert img[int(o.cy), int(o.cx)].max() < 80
    assert img.max() > 180
    with pytest.raises(ValueError):
        sc.draw_scene(combo, np.random.default_rng(3), style="glossy")


def test_combo_json_roundtrip():
    for combo in sc.all_combos()[::37]:
        assert sc.combo_from_json(sc.combo_to_json(combo)) == combo


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "data"
    meta = d.write_dataset(out, n=400, seed=3, n_test=60)
    return out, meta


def test_dataset_rows_splits_and_fractions(small, tmp_path):
    out, meta = small
    rows, test = d.read_jsonl(out / "train.jsonl"), d.read_jsonl(out / "test.jsonl")
    assert len(rows) == 400 and len(test) == 60
    held = {sc.combo_from_json(c) for c in meta["heldout"]}
    assert all(d.row_combo(r) not in held for r in rows)
    assert all(d.row_combo(r) in held for r in test)
    ones = sum(len(r["objects"]) == 1 for r in rows)
    assert 60 <= ones <= 140  # ~25 % one-object
    for name, k in meta["subsets"].items():
        assert d.read_jsonl(out / name) == rows[:k]  # nested prefixes
    assert meta["subsets"]["train_5pct.jsonl"] == 20
    assert set(rows[0]) >= {"image", "zh", "en", "layout", "objects", "style", "split"}
    assert (out / rows[0]["image"]).is_file()
    assert set(meta["zh_characters"]) >= {ch for r in rows for ch in r["zh"]}
    again = tmp_path / "again"
    d.write_dataset(again, n=400, seed=3, n_test=60)
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert np.array_equal(d.load_images(again / "test.jsonl"), d.load_images(out / "test.jsonl"))
