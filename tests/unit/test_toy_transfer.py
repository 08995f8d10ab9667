"""The toy transfer table's torch-free parts: encoder config, Markdown table, eval wiring."""

import numpy as np
from click.testing import CliRunner

from iap_rt.toy import evaluate, transfer
from iap_rt.toy.cli import toy


def test_encoder_config_matches_the_unet_width_and_vocab():
    cfg = transfer.encoder_config(vocab_size=50, width=64)
    assert cfg["model_type"] == "bert"
    assert (cfg["vocab_size"], cfg["hidden_size"]) == (50, 64)
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0


def _row(name, v):
    return {"conditioning": name, "colour": v, "shape": v, "position": v, "all": v, "n": 8}


def test_markdown_has_one_line_per_row_and_all_columns():
    rows = [_row("English", 1.0) | {"agreement": 1.0, "pixel_mse": 0.0}]
    rows.append(
        _row("Chinese, IAP `pivot`", 0.5)
        | {"agreement": 0.25, "pixel_mse": 0.01, "train_s": 12.3, "samples_seen": 640}
    )
    rec = {"fraction": "10pct", "seed": 0, "train": {"steps": 10, "batch_size": 64}, "rows": rows}
    md = transfer.markdown(rec)
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 3  # header + 2 rows
    assert "agreement w/ English" in table[0] and "samples seen" in table[0]
    assert "| 0.250 | 0.0100 | 12 | 640 |" in table[2]


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
