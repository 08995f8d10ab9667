"""The transfer grid's result files: one row per (objective, fraction, seed), summary, the claim."""

from __future__ import annotations

import json

from iap_rt.train.toy.report import aggregate, fraction_value

SCORES = {"colour": 0.9, "shape": 0.9, "relation": 0.8, "one_all": 1.0, "agreement": 0.7,
          "agreement_two": 0.65, "pixel_mse": 0.01, "n": 216, "n_two": 192, "n_one": 24}  # fmt: skip


def _cell(work, objective, fraction, seed, binding, cpu=180.0, objects=None):
    name = f"s{seed}_untrained" if objective == "untrained" else f"{fraction}_s{seed}_{objective}"
    row = SCORES | {"objective": objective, "fraction": fraction, "seed": seed,
                    "binding": binding, "objects": binding if objects is None else objects,
                    "train_cpu_s": cpu, "steps": 100,
                    "samples_seen": 6400}  # fmt: skip
    (work / "cells" / f"{name}.json").write_text(json.dumps(row))


def test_results_rows_summary_and_claim(tmp_path):
    work, base = tmp_path / "work", tmp_path / "base"
    (work / "cells").mkdir(parents=True)
    base.mkdir()
    (work / "english.json").write_text(json.dumps(SCORES | {"binding": 0.6, "lang": "en"}))
    (work / "base.json").write_text(json.dumps({"base": str(base), "sha256": "ab" * 32}))
    (base / "toy_base.json").write_text(json.dumps({
        "config": {"seed": 0}, "train_cpu_minutes": 90.0, "steps": 2000,
        "samples_seen": 128000, "torch_threads": 1}))  # fmt: skip
    for s in (0, 1, 2):
        _cell(work, "untrained", "0pct", s, 0.0, cpu=0.0)
        _cell(work, "pivot", "5pct", s, 0.5 + 0.01 * s)
        _cell(work, "pivot", "10pct", s, 0.55, objects=0.8 + 0.1 * s)
        _cell(work, "denoise", "100pct", s, 0.4, cpu=900.0, objects=0.75)
    setup = {"base": str(base), "budget_cpu_s": 180.0, "seeds": [0, 1, 2],
             "long": {"factor": 5}, "eval": {"steps": 25, "guidance": 3.0},
             "s_per_step_cpu": {"pivot": 0.2, "denoise": 0.5}}  # fmt: skip
    rec = aggregate(work, tmp_path / "results", setup)
    saved = json.loads((tmp_path / "results" / "toy_transfer.json").read_text())
    assert saved["results"] == rec["results"]
    assert saved["base_used"] == {"base": str(base), "sha256": "ab" * 32}  # which base made it
    keys = [(r["objective"], r["fraction"], r["seed"]) for r in saved["results"]]
    assert keys[0] == ("untrained", 0.0, 0) and ("english", 1.0, 0) in keys
    assert ("pivot", 0.05, 2) in keys and ("denoise", 1.0, 1) in keys and len(keys) == 13
    assert all(isinstance(r["binding"], float) for r in saved["results"])
    piv5 = next(s for s in saved["summary"] if (s["objective"], s["fraction"]) == ("pivot", 0.05))
    assert abs(piv5["binding"]["mean"] - 0.51) < 1e-9 and piv5["binding"]["n"] == 3
    assert saved["claim"]["holds"] is True and abs(saved["claim"]["denoise_100pct"] - 0.4) < 1e-9
    md = (tmp_path / "results" / "toy_transfer.md").read_text()
    assert "**holds**" in md and "| 5 % | IAP `pivot` |" in md and "0.51 ± 0.01" in md
    # pivot 10 % - denoise 100 %: binding +0.15, no spread: beyond 2 SE; objects: seeds 0.8,
    # 0.9, 1.0 (sd 0.1) vs 0.75: +0.15 ± 0.1 / sqrt(3) = 0.058, beyond 2 SE (0.115)
    vs = saved["claim"]["pivot_10pct_minus_denoise_100pct"]
    assert abs(vs["binding"]["diff"] - 0.15) < 1e-9 and vs["binding"]["beyond_2se"] is True
    assert abs(vs["objects"]["se"] - 0.1 / 3**0.5) < 1e-9 and vs["objects"]["beyond_2se"] is True
    assert "objects +0.15 ± 0.06 (more than 2 SE)" in md
    # the compact table: objectives x fractions, "binding / objects" seed means
    assert "| binding / objects | 5 % | 10 % | 100 % |" in md
    assert "| IAP `pivot` | 0.51 / 0.51 | 0.55 / 0.90 | – |" in md
    assert "| `denoise` | – | – | 0.40 / 0.75 |" in md
    assert "For reference: English base (upper bound) 0.60; untrained encoder 0.00 / 0.00." in md


def test_versus_within_noise_and_missing_key():
    from iap_rt.train.toy.report import versus

    a = {"binding": {"mean": 0.30, "sd": 0.05, "n": 3}}
    b = {"binding": {"mean": 0.25, "sd": 0.05, "n": 3}}
    v = versus(a, b, "binding")
    assert abs(v["se"] - (2 * 0.05**2 / 3) ** 0.5) < 1e-12 and v["beyond_2se"] is False
    assert versus(a, b, "objects") is None


def test_fraction_names():
    assert [fraction_value(f) for f in ("0pct", "1pct", "5pct", "10pct", "100pct")] == [
        0.0, 0.01, 0.05, 0.1, 1.0]  # fmt: skip


def _png_size(path):
    import struct

    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])  # width, height


def test_curves_plot_adds_an_objects_row_only_when_every_point_has_it(tmp_path):
    from iap_rt.train.toy.curves import plot

    def pts(b, objects=True):
        extra = (lambda v: {"objects": v}) if objects else (lambda v: {})
        return [{"step": 0, "cpu_s": 0.0, "samples": 0, "binding": 0.0} | extra(0.0),
                {"step": 5, "cpu_s": 90.0, "samples": 320, "binding": b} | extra(2 * b)]  # fmt: skip

    both = {"english_binding": 0.5, "english_objects": 0.9, "curves": [
        {"objective": "pivot", "fraction": "10pct", "points": pts(0.2)},
        {"objective": "denoise", "fraction": "100pct", "points": pts(0.1)}]}  # fmt: skip
    one = {"english_binding": 0.5, "curves": [
        {"objective": "pivot", "fraction": "10pct", "points": pts(0.2)},
        {"objective": "denoise", "fraction": "100pct", "points": pts(0.1, objects=False)}]}  # fmt: skip
    w2, h2 = _png_size(plot(both, tmp_path / "both.png"))
    w1, h1 = _png_size(plot(one, tmp_path / "one.png"))
    assert w1 == w2 and h2 > 1.8 * h1
