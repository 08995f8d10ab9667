"""`iap-rt toy` commands and modules that need no torch to start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import iap_rt.train.toy


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
    assert enc["max_position_embeddings"] == 40  # two-object captions fit
    rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"image", "zh", "en", "layout", "objects"} <= set(rows[0])
    assert (out / "data" / "train_10pct.jsonl").is_file()
    again = run_cli("toy", "unpack", "--out", str(out), "--n", "0")
    assert again.code != 0 and "exists" in again.err


def test_transfer_refuses_bad_seeds_and_missing_fractions(tmp_path, run_cli, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "IAP_RT_THREADS"):  # the command sets them
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    base = tmp_path / "base"
    base.mkdir()
    r = run_cli("toy", "transfer", "--data", str(tmp_path), "--base", str(base),
                "--work", str(tmp_path / "w"), "--seeds", "0,x")  # fmt: skip
    assert r.code != 0 and "--seeds" in r.err and "0,x" in r.err
    r = run_cli("toy", "transfer", "--data", str(tmp_path), "--base", str(base),
                "--work", str(tmp_path / "w"), "--fractions", "5pct")  # fmt: skip
    assert r.code != 0 and "train_5pct.jsonl is missing" in r.err and "iap-rt toy data" in r.err
    assert not (tmp_path / "w").exists()


def test_eval_refuses_a_directory_that_is_no_model(tmp_path, run_cli):
    r = run_cli("toy", "eval", "--model", str(tmp_path), "--lang", "zh")
    assert r.code != 0 and "neither a diffusers base directory" in r.err


def test_every_toy_module_imports_without_torch():
    """Torch is imported inside the functions that need it, so `iap-rt toy data` and the
    numpy checker run without it."""
    names = sorted(p.stem for p in Path(iap_rt.train.toy.__file__).parent.glob("*.py"))
    assert {"cli", "data", "checker", "evaluate", "transfer"} <= set(names)
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module('iap_rt.train.toy.' + n)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
