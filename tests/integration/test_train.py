"""``iap-rt train`` end to end on the tiny base + tiny encoder + a generated dataset (CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

COLOURS = {
    "红色": ("red", (220, 30, 30)),
    "绿色": ("green", (30, 200, 30)),
    "蓝色": ("blue", (30, 30, 220)),
    "黄色": ("yellow", (230, 230, 20)),
    "紫色": ("purple", (150, 40, 200)),
    "白色": ("white", (245, 245, 245)),
}
TOML = """[train]
resolution = 64
batch_size = 4
lr = 1e-3
warmup_steps = 0
log_every = 1
val_every = 0
checkpoint_every = 0
"""


def cli(*args) -> int:
    """Run ``iap-rt`` in-process; return its exit code."""
    from iap_rt.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def snapshot(path: Path) -> dict:
    """relative path -> sha256 of every file under ``path``."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def write_images(d: Path, rows: int = 6) -> list[dict]:
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (zh, (en, c)) in enumerate(list(COLOURS.items())[:rows]):
        a = np.zeros((72, 88, 3), np.uint8) + np.array(c, np.uint8)  # not square: crop
        a[20 + 4 * i : 50, 30:60] = 255 - np.array(c, np.uint8)
        Image.fromarray(a).save(d / f"{i}.png")
        out.append({"image": f"{i}.png", "zh": f"一个{zh}的方块", "en": f"a {en} square"})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_sd_dir, tiny_encoder_dir):
    """A workspace: data/ (6 images + data.jsonl), train.toml, base and encoder paths."""
    root = tmp_path_factory.mktemp("train")
    rows = write_images(root / "data")
    write_jsonl(root / "data" / "data.jsonl", rows)
    (root / "train.toml").write_text(TOML, "utf-8")
    return {
        "root": root,
        "rows": rows,
        "args": [
            "--base",
            tiny_sd_dir,
            "--encoder",
            tiny_encoder_dir,
            "--data",
            root / "data" / "data.jsonl",
            "--config",
            root / "train.toml",
        ],
    }


@pytest.fixture(scope="module")
def trained(ws, tiny_sd_dir):
    """One pivot run of 40 steps with validation and a sample prompt."""
    out = ws["root"] / "run"
    toml = ws["root"] / "val.toml"
    toml.write_text(
        TOML.replace("val_every = 0", "val_every = 20")
        + 'val_count = 2\nsample_prompts = ["红色的方块"]\nsample_steps = 2\n',
        "utf-8",
    )
    args = [a if a != ws["root"] / "train.toml" else toml for a in ws["args"]]
    assert cli("train", *args, "--out", out, "--max-steps", 40) == 0
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text("utf-8").splitlines()]


def test_pivot_training_lowers_the_loss_and_the_output_exports(trained, tiny_sd_dir, tmp_path):
    from iap_rt.export.stage import export_model_dir

    steps = [m for m in _metrics(trained) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 41))
    first = sum(m["loss"] for m in steps[:5]) / 5
    last = sum(m["loss"] for m in steps[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    val = [m for m in _metrics(trained) if "val_loss" in m]
    assert [m["step"] for m in val] == [20, 40]
    assert val[-1]["val_loss"] < val[0]["val_loss"] and -1 <= val[-1]["val_cosine"] <= 1
    assert (trained / "samples" / "step-00000040" / "00.png").is_file()
    record = json.loads((trained / "train_config.json").read_text("utf-8"))
    assert record["config"]["objective"] == "pivot" and record["summary"]["steps"] == 40
    assert record["summary"]["data"]["val_rows"] == 2
    model = export_model_dir(tiny_sd_dir, trained / "chinese_encoder", tmp_path / "model")
    assert (model / "manifest.json").is_file() and (model / "text_encoder.onnx").is_file()


@pytest.mark.parametrize("objective", ["full", "embed", "denoise"])
def test_every_objective_trains(ws, objective, tmp_path):
    out = tmp_path / "run"
    assert cli("train", *ws["args"], "--out", out, "--objective", objective, "--max-steps", 3) == 0
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    from iap_rt.train.encoder import ChineseTextEncoder

    assert ChineseTextEncoder.load(out / "chinese_encoder").output_dim == 32


def test_resume_after_kill_matches_an_uninterrupted_run(ws, tmp_path):
    toml = tmp_path / "ckpt.toml"
    text = TOML.replace("checkpoint_every = 0", "checkpoint_every = 3")
    text = text.replace("batch_size = 4", "batch_size = 2\ngrad_accum = 2\nema_decay = 0.9")
    toml.write_text(text, "utf-8")  # resume must restore EMA and accumulate the same way
    args = [a if a != ws["root"] / "train.toml" else toml for a in ws["args"]]
    args += ["--max-steps", 45, "--objective", "pivot"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert cli("train", *args, "--out", ref) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from iap_rt.cli import main; main()", "train"]
    proc = subprocess.Popen(
        [*cmd, *map(str, args), "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list((killed / "checkpoints").glob("step-*")) and time.time() < deadline:
            assert proc.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-run: some steps after the checkpoint are lost
    finally:
        proc.wait()
    assert not (killed / "chinese_encoder").exists(), "killed too late to test anything"

    assert cli("train", *args, "--out", killed, "--resume") == 0
    a = load_file(str(ref / "chinese_encoder" / "model.safetensors"))
    b = load_file(str(killed / "chinese_encoder" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa = load_file(str(ref / "chinese_encoder" / "projection.safetensors"))
    pb = load_file(str(killed / "chinese_encoder" / "projection.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = [{k: v for k, v in m.items() if k != "samples_per_s"} for m in _metrics(ref)]
    assert strip == [{k: v for k, v in m.items() if k != "samples_per_s"} for m in _metrics(killed)]
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == ["step-00000039", "step-00000042", "step-00000045"]  # keep_checkpoints = 3


def test_cache_only_builds_the_cache_once(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", *ws["args"], "--out", out, "--cache-only") == 0
    assert "6 images and 7 captions encoded" in capsys.readouterr().out
    assert not (out / "checkpoints").exists() and not (out / "chinese_encoder").exists()
    assert cli("train", *ws["args"], "--out", out, "--cache-only") == 0
    assert "0 images and 0 captions encoded" in capsys.readouterr().out
    assert cli("train", *ws["args"], "--out", out, "--max-steps", 1) == 0
    record = json.loads((out / "train_config.json").read_text("utf-8"))
    assert record["summary"]["data"]["latents_encoded"] == 0


def test_csv_data_file(ws, tmp_path, capsys):
    rows = ws["rows"]
    csv = ws["root"] / "data" / "data.csv"
    csv.write_text("image,zh,en\n" + "".join(f"{r['image']},{r['zh']},{r['en']}\n" for r in rows))
    args = [*ws["args"][:4], "--data", csv, *ws["args"][6:]]
    assert cli("train", *args, "--out", tmp_path / "run", "--cache-only") == 0
    assert "6 usable rows" in capsys.readouterr().out


def test_bad_images_are_skipped_counted_and_limited(ws, tmp_path, capsys):
    d = tmp_path / "data"
    rows = write_images(d)
    (d / "0.png").write_bytes(b"not a png")
    rows.append({"image": "missing.png", "zh": "猫", "en": "a cat"})
    data = write_jsonl(d / "data.jsonl", rows)
    args = [*ws["args"][:4], "--data", data, "--config", ws["root"] / "train.toml"]
    assert cli("train", *args, "--out", tmp_path / "strict", "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert "2 of 7 rows" in err and "max_bad_fraction" in err
    assert not (tmp_path / "strict").exists()
    toml = tmp_path / "lenient.toml"
    toml.write_text(TOML + "max_bad_fraction = 0.5\n", "utf-8")
    args[-1] = toml
    assert cli("train", *args, "--out", tmp_path / "lenient", "--max-steps", 1) == 0
    assert "skipped 2 of 7 rows" in capsys.readouterr().out


# ---- bad input: a clear error, non-zero exit, nothing written or overwritten ------------


def _fails(capsys, args, out: Path, *needles: str) -> None:
    before = snapshot(out) if out.exists() else None
    code = cli("train", *args, "--out", out)
    err = capsys.readouterr().err
    assert code != 0, err
    assert "error: " in err and all(n in err for n in needles), err
    assert (snapshot(out) if out.exists() else None) == before


def test_base_without_unet(ws, tiny_sd_dir, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (base / sub).symlink_to(Path(tiny_sd_dir) / sub)
    args = ["--base", base, *ws["args"][2:]]
    _fails(capsys, args, tmp_path / "out", "missing unet/")


def test_encoder_without_tokenizer(ws, tiny_encoder_dir, tmp_path, capsys):
    enc = tmp_path / "enc"
    enc.mkdir()
    for f in Path(tiny_encoder_dir).iterdir():
        if f.name not in ("tokenizer.json", "vocab.txt"):
            (enc / f.name).symlink_to(f)
    args = [*ws["args"][:2], "--encoder", enc, *ws["args"][4:]]
    _fails(capsys, args, tmp_path / "out", "has no tokenizer", "tokenizer.json")


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("missing.jsonl", '{"image": "0.png", "zh": "猫"}\n', "row 1 has no 'en' column"),
        ("header.csv", "image,en\n0.png,a cat\n", "no 'zh' column"),
        ("empty.jsonl", "\n", "zero rows"),
        ("nowhere.jsonl", '{"image": "gone.png", "zh": "猫", "en": "a cat"}\n', "zero usable"),
    ],
)
def test_data_file_problems(ws, tmp_path, capsys, name, text, needle):
    data = ws["root"] / "data" / name
    data.write_text(text, "utf-8")
    args = [*ws["args"][:4], "--data", data, *ws["args"][6:]]
    _fails(capsys, args, tmp_path / "out", needle)


def test_resolution_not_a_multiple_of_8(ws, tmp_path, capsys):
    _fails(capsys, [*ws["args"], "--resolution", 100], tmp_path / "out", "resolution 100")


def test_resume_without_checkpoint(ws, tmp_path, capsys):
    _fails(capsys, [*ws["args"], "--resume"], tmp_path / "out", "no checkpoint")


def test_resume_from_a_checkpoint_of_another_config(ws, trained, capsys):
    args = [*ws["args"], "--resume", "--max-steps", 40, "--lr", 5e-4]
    _fails(capsys, args, trained, "different config", "lr: checkpoint 0.001, now 0.0005")


def test_existing_run_is_not_overwritten(ws, trained, capsys):
    _fails(capsys, [*ws["args"], "--max-steps", 40], trained, "already holds", "--resume")


def test_unknown_config_key(ws, tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nlearning_rate = 1.0\n", "utf-8")
    _fails(capsys, [*ws["args"][:-1], toml], tmp_path / "out", "learning_rate", "valid keys")
