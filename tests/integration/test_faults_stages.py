"""Issue 16 on the stages: export and train refuse bad bases before any work, nothing pickled
is ever unpickled, and what a killed export leaves is removed by the next run on the model."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iap_rt.errors import ArtifactError
from iap_rt.export.stage import export_model_dir
from iap_rt.fileio import leftovers
from iap_rt.memory import arch_from_configs
from iap_rt.modeldir import ModelDir


class _Tripwire:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _copy_base(tiny_sd_dir, dst: Path) -> Path:
    shutil.copytree(tiny_sd_dir, dst)
    return dst


def _sdxl(tiny_sd_dir, dst: Path) -> Path:
    base = _copy_base(tiny_sd_dir, dst)
    cfg = json.loads((base / "unet" / "config.json").read_text())
    cfg.update(addition_embed_type="text_time", addition_time_embed_dim=8)
    (base / "unet" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(base / "text_encoder", base / "text_encoder_2")
    return base


@pytest.fixture
def scratch(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_export_with_a_pickled_unet_is_refused_before_anything_is_exported(
    scratch, tiny_sd_dir, tiny_encoder_dir, tmp_path
):
    base = _copy_base(tiny_sd_dir, tmp_path / "base")
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    before, lines = _tree(scratch), []
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError) as e:
        export_model_dir(base, tiny_encoder_dir, scratch, force=True, echo=lines.append)
    assert time.perf_counter() - t0 < 5  # configs only: no network was loaded
    msg = str(e.value)
    assert "pickled weights only (unet/diffusion_pytorch_model.bin)" in msg
    assert "has unpickled nothing" in msg and "save_pretrained" in msg
    assert "free disk space" not in msg
    assert not any("exporting" in ln for ln in lines), lines  # not even the text encoder
    assert not marker.exists() and _tree(scratch) == before and leftovers(scratch) == []


def test_export_with_a_pickled_encoder_is_refused_before_anything_is_exported(
    scratch, tiny_sd_dir, tiny_encoder_dir, tmp_path
):
    enc = tmp_path / "enc"
    shutil.copytree(tiny_encoder_dir, enc)
    (enc / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (enc / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    lines = []
    with pytest.raises(ArtifactError, match="pickled weights only \\(pytorch_model.bin\\)"):
        export_model_dir(tiny_sd_dir, enc, scratch, force=True, echo=lines.append)
    assert not lines and not marker.exists()


def test_export_refuses_an_sdxl_pipeline_before_any_work(
    scratch, tiny_sd_dir, tiny_encoder_dir, tmp_path
):
    base = _sdxl(tiny_sd_dir, tmp_path / "sdxl")
    before, lines = _tree(scratch), []
    with pytest.raises(ArtifactError) as e:
        export_model_dir(base, tiny_encoder_dir, scratch, force=True, echo=lines.append)
    msg = str(e.value)
    assert "not a supported base model" in msg and "text_encoder_2" in msg
    assert "addition_embed_type 'text_time'" in msg and "Stable Diffusion 1.x/2.x" in msg
    assert not lines and _tree(scratch) == before


def test_train_refuses_an_sdxl_pipeline_before_any_work(tiny_sd_dir, tiny_encoder_dir, tmp_path,
                                                        capsys):  # fmt: skip
    from iap_rt.cli import main

    base = _sdxl(tiny_sd_dir, tmp_path / "sdxl")
    (tmp_path / "0.png").write_bytes(b"")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "0.png", "zh": "猫", "en": "cat"}) + "\n", "utf-8")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--base", str(base), "--encoder", str(tiny_encoder_dir), "--data",
              str(data), "--out", str(out), "--max-steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert "not a supported base model" in err and "text_encoder_2" in err
    assert not out.exists()


def test_the_export_records_the_architecture_the_memory_guard_reads(tiny_model_dir, tiny_sd_dir):
    unet = json.loads((Path(tiny_sd_dir) / "unet" / "config.json").read_text())
    vae = json.loads((Path(tiny_sd_dir) / "vae" / "config.json").read_text())
    arch = ModelDir.open(tiny_model_dir).manifest["arch"]
    assert arch == arch_from_configs(unet, vae)
    assert arch["unet"]["channels"] == [32, 64] and arch["unet"]["attention_heads"] == [8, 0]


def test_a_killed_export_leaves_a_staging_dir_the_next_generate_removes(
    scratch, tiny_sd_dir, tiny_encoder_dir, tmp_path
):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "iap_rt.cli", "export", "--base", str(tiny_sd_dir),
           "--encoder", str(tiny_encoder_dir), "--out", str(scratch), "--force",
           "--engines", "none"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the first network is in the staging directory
            staged = [p for p in leftovers(scratch) if any(p.glob("*.onnx"))]
            if staged or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert staged, proc.communicate()[0]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert leftovers(scratch) == staged  # what the kill left

    from iap_rt.cli import main

    def run(*args):
        try:
            main(list(args))
        except SystemExit as e:
            return e.code
        return 0

    assert run("info", "--model", str(scratch)) == 0
    assert leftovers(scratch) == staged  # info reports, does not remove
    out = tmp_path / "a.png"
    assert run("generate", "山水画", "--model", str(scratch), "--steps", "1", "--height", "16",
               "--width", "16", "--out", str(out), "--no-progress") == 0  # fmt: skip
    assert leftovers(scratch) == [] and out.is_file()
    ModelDir.open(scratch)  # the model the killed export would have replaced is intact
