"""Every script under ``bench/`` runs at tiny size (``bench/ort_cpu_mha.py``, which needs
no torch, is in ``tests/unit/test_bench_no_torch.py``; ``bench/gpu_check.sh`` is rehearsed by
``test_gpu_check_dry_run.py``). Each writes its JSON to a temporary file;
the checks are on its layout and on what it did, never on its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_script(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_engine_script_exports_and_builds_the_tiny_unet(tmp_path):
    """bench/engine_sd15.py --arch tiny: fp16 ONNX through the export stage's steps, then a
    TensorRT-RTX engine (no GPU needed); a second run reuses the ONNX."""
    pytest.importorskip("tensorrt_rtx", reason="engine builds need tensorrt-rtx-cu13")
    out, work = tmp_path / "engine.json", tmp_path / "work"
    run_script("engine_sd15.py", "--arch", "tiny", "--work", str(work), "--out", str(out))
    doc = json.loads(out.read_text())
    export, engine = doc["export"], doc["engine"]
    assert export["onnx_files"] == ["unet.onnx"] and (work / "unet.onnx").is_file()
    assert export["attention"]["total"] == export["attention"]["fusable"] == 8
    assert engine["profile"] == "N2_h8_w8" and engine["onnx_attentions"] == 8
    assert (work / "unet.N2_h8_w8.plan").stat().st_size == engine["engine_bytes"] > 0
    inputs = {t["name"]: t["dtype"] for t in engine["io"]["inputs"]}
    assert inputs == {
        "sample": "float16",
        "timestep": "float32",
        "encoder_hidden_states": "float16",
    }
    assert engine["engine_layers"] > 0 and engine["fused_attention_layers"] is not None

    run_script("engine_sd15.py", "--arch", "tiny", "--work", str(work), "--out", str(out))
    again = json.loads(out.read_text())
    assert again["export"]["reused_from"] == doc["date"]


def test_export_script_exports_one_network_per_child(tmp_path):
    """bench/export_sd15.py --arch tiny: builds the tiny sources, exports in a child."""
    out, work = tmp_path / "export.json", tmp_path / "work"
    run_script(
        "export_sd15.py", "--arch", "tiny", "--work", str(work), "--jobs", "fp16:text_encoder",
        "--threads", "1", "--out", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    (job,) = doc["jobs"]
    assert (job["precision"], job["network"]) == ("fp16", "text_encoder")
    assert job["peak_rss_gb"] > 0 and job["onnx_bytes"] > 0 and job["validation"]
    assert job["max_abs_diff_vs_torch_fp32"] <= max(r["tolerance"] for r in job["validation"])
    assert "torch" in doc["versions"] and "trt_rtx_fp16_unet" not in doc  # no fp16 UNet job
    manifest = json.loads((work / "model-fp16" / "manifest.json").read_text())
    assert manifest["model_id"] == "tiny-random-fp16"


def test_cpu_roofline_script_at_tiny_size(tmp_path):
    """bench/cpu_roofline.py --arch tiny: FLOPs of the tiny UNet call, small kernel ceilings,
    against the committed tiny bench medians."""
    out = tmp_path / "roofline.json"
    run_script("cpu_roofline.py", "--arch", "tiny", "--threads", "1", "--out", str(out))
    doc = json.loads(out.read_text())
    assert doc["config"]["latents"] == [8, 8] and doc["flops"]["total_gflop"] > 0
    assert doc["kernels"]["ceiling_gflops"] > 0
    for backend in ("torch", "ort"):
        row = doc["achieved"][backend]
        assert row["source"] == "bench/results/bench_tiny.json" and row["gflops"] > 0


def test_train_script_at_tiny_size(tmp_path):
    """bench/train_bench.py --arch tiny: one child per objective, each a real optimizer step."""
    out = tmp_path / "train.json"
    run_script(
        "train_bench.py", "--arch", "tiny", "--steps", "1", "--objectives", "pivot,full",
        "--out", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert [r["objective"] for r in doc["results"]] == ["pivot", "full"]
    for r in doc["results"]:
        assert r["steps_timed"] == 1 and r["samples_per_s"] > 0 and r["cross_attention_layers"] > 0
    assert set(doc["ratios"]) == {"pivot_over_full_samples_per_s", "pivot_over_full_peak_rss"}


def test_toy_edit_script_at_tiny_size(tmp_path):
    """bench/toy_edit.py: both tasks scored by the checker, nothing outside the mask changed."""
    out, grid = tmp_path / "e.json", tmp_path / "e.png"
    run_script("toy_edit.py", "--cases", "2", "--steps", "6", "--out", str(out), "--grid",
               str(grid), timeout=600)  # fmt: skip
    doc = json.loads(out.read_text("utf-8"))
    assert len(doc["cases"]["recolour"]) == len(doc["cases"]["repaint_half"]) == 2
    assert doc["summary"]["repaint_half"]["max_change_outside_mask"] == 0
    for task in ("recolour", "repaint_half"):
        assert 0.0 <= doc["summary"][task]["both"] <= 1.0
    assert grid.read_bytes()[:4] == b"\x89PNG"
