"""The toy transfer table's torch-free parts: encoder config, Markdown table, eval wiring."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from iap_rt.train.toy import evaluate, transfer
from iap_rt.train.toy.cli import toy


def test_encoder_config_matches_the_unet_width_and_vocab():
    cfg = transfer.encoder_config(vocab_size=50, width=64)
    assert cfg["model_type"] == "bert"
    assert (cfg["vocab_size"], cfg["hidden_size"]) == (50, 64)
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0


def _cell(row, seed, v, **kw):
    return {
        "row": row, "seed": seed, "colour": v, "shape": v, "position": v, "all": v, "n": 8,
        "agreement": v, "pixel_mse": 0.01 * v, "steps": 10, "train_s": 12.0 + seed,
        "samples_seen": 640,
    } | kw  # fmt: skip


def test_aggregate_means_and_spreads_over_seeds_per_fraction(tmp_path):
    work = tmp_path / "work"
    (work / "cells").mkdir(parents=True)
    english = _cell("english", 0, 1.0) | {"pixel_mse": 0.0}
    (work / "english.json").write_text(json.dumps(english))
    for seed, v in ((0, 0.5), (1, 0.7)):
        for row in transfer.ROW_ORDER[1:]:
            name = transfer.cell_name("10pct", seed, row)
            val = v if row == "pivot" else 0.2
            (work / "cells" / f"{name}.json").write_text(json.dumps(_cell(row, seed, val)))
    setup = {"budget_s": 60, "parallel_cells": 2, "seeds": [0, 1],
             "eval": {"seeds_per_combo": 3, "steps": 25, "guidance": 3.0}}  # fmt: skip
    rec = transfer.aggregate(work, tmp_path / "res", ("10pct",), (0, 1), setup)
    rows = {r["row"]: r for r in rec["tables"]["10pct"]}
    assert list(rows) == list(transfer.ROW_ORDER)
    assert rows["pivot"]["all"]["mean"] == pytest.approx(0.6)
    assert rows["pivot"]["all"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["pivot"]["train_s"]["values"] == [12.0, 13.0]
    assert rows["english"]["all"]["mean"] == 1.0
    md = (tmp_path / "res" / "toy_transfer.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(transfer.ROW_ORDER)
    assert "agreement w/ English" in table[0] and "samples seen" in table[0]
    pivot = next(ln for ln in table if "`pivot`" in ln)
    assert "| 0.600 ± 0.141 |" in pivot and pivot.endswith("| 12 | 10 | 640 |")
    assert json.loads((tmp_path / "res" / "toy_transfer.json").read_text()) == rec


def test_untrained_cell_is_shared_by_fractions():
    assert transfer.cell_name("1pct", 2, "untrained") == transfer.cell_name("10pct", 2, "untrained")
    assert transfer.cell_name("1pct", 2, "pivot") != transfer.cell_name("10pct", 2, "pivot")


def test_runtime_generator_uses_the_pipeline_noise_of_each_seed(monkeypatch):
    calls = []

    class FakePipe:
        def __call__(self, prompt, steps, guidance, seed, scheduler):
            calls.append((prompt, seed, scheduler))
            return type("R", (), {"images": np.full((1, 32, 32, 3), seed, np.uint8)})

    import iap_rt.pipeline

    monkeypatch.setattr(
        iap_rt.pipeline.Pipeline, "from_dir", classmethod(lambda *a, **k: FakePipe())
    )
    gen = evaluate.runtime_generator("unused", steps=3)
    out = gen(["左边有一个红色的圆", "蓝色方块"], [5, 7])
    assert out.shape == (2, 32, 32, 3) and out[1, 0, 0, 0] == 7
    assert calls == [("左边有一个红色的圆", 5, "ddim"), ("蓝色方块", 7, "ddim")]


def test_eval_refuses_a_directory_that_is_no_model(tmp_path):
    res = CliRunner().invoke(toy, ["eval", "--model", str(tmp_path), "--lang", "zh"])
    assert res.exit_code != 0
