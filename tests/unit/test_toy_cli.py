"""`iap-rt toy` commands that need no torch."""

import json


def test_unpack_writes_the_shipped_base_and_a_dataset(tmp_path, run_cli):
    out = tmp_path / "toy"
    r = run_cli("toy", "unpack", "--out", str(out), "--n", "40")
    assert r.code == 0, r.err
    idx = json.loads((out / "base" / "model_index.json").read_text())
    assert idx["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet = json.loads((out / "base" / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 3 and any((out / "base" / "unet").glob("*.safetensors"))
    assert not (out / "base" / "checkpoint").exists()
    enc = json.loads((out / "encoder_config.json").read_text())
    assert enc["model_type"] == "bert" and enc["hidden_size"] == unet["cross_attention_dim"]
    assert enc["vocab_size"] == 21128  # bert-base-chinese WordPiece, what train tokenizes with
    rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"image", "zh", "en"} <= set(rows[0])
    again = run_cli("toy", "unpack", "--out", str(out), "--n", "0")
    assert again.code != 0 and "exists" in again.err


def test_transfer_refuses_bad_seeds_and_missing_fractions(tmp_path, run_cli):
    base = tmp_path / "base"
    base.mkdir()
    r = run_cli("toy", "transfer", "--data", str(tmp_path), "--base", str(base),
                "--work", str(tmp_path / "w"), "--seeds", "0,x")  # fmt: skip
    assert r.code != 0 and "--seeds" in r.err and "0,x" in r.err
    r = run_cli("toy", "transfer", "--data", str(tmp_path), "--base", str(base),
                "--work", str(tmp_path / "w"), "--fractions", "5pct")  # fmt: skip
    assert r.code != 0 and "train_5pct.jsonl is missing" in r.err and "iap-rt toy data" in r.err
    assert not (tmp_path / "w").exists()
