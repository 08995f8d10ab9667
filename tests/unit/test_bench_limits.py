"""``iap-rt bench`` survives a hang: each backend's worker runs under its time limit and is
killed past it, the result JSON is on disk after every backend (``complete: false`` until
the last), and each result records the precisions it ran so that unequal VAE precisions
are named. The hanging worker is a planted module; the working one is the real ORT worker
on the embedded toy model."""

from __future__ import annotations

import json
import time

import pytest

from iap_rt.bench import protocol
from iap_rt.bench.config import BenchConfig
from iap_rt.bench.protocol import WorkerSpec, spawn_worker
from iap_rt.bench.report import precision_notes
from iap_rt.bench.run import run_bench
from iap_rt.bench.sources import Sources, export_args
from iap_rt.errors import ConfigError
from iap_rt.modeldir import default_model_dir

HANG = """
import os, shutil, sys, time
seen = os.environ.get("HANG_SEEN")
if seen and os.path.exists(os.environ["HANG_OUT"]):  # what the parent had written so far
    shutil.copy(os.environ["HANG_OUT"], seen)
print("hanging in a CUDA call", file=sys.stderr, flush=True)
time.sleep(120)
"""


@pytest.fixture
def hang_module(tmp_path, monkeypatch):
    """A worker module that never finishes, importable by the worker processes."""
    (tmp_path / "hang_worker.py").write_text(HANG)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "hang_worker"


def test_timeout_option_parses_defaults_and_per_backend_limits():
    cfg = BenchConfig(timeout="torch=900, ort=30.5,600")
    assert cfg.timeout_for("torch") == 900 and cfg.timeout_for("ort") == 30.5
    assert cfg.timeout_for("trt") == 600
    assert BenchConfig().timeout_for("ort") is None
    assert BenchConfig(timeout="ort=5").timeout_for("trt") is None
    for bad in ("soon", "tensorflow=5", "ort=-1", "0"):
        with pytest.raises(ConfigError, match="--timeout item"):
            BenchConfig(timeout=bad).check()


def _spec(backend: str, tmp_path) -> WorkerSpec:
    return WorkerSpec(
        backend=backend, model_dir=str(default_model_dir()), base_dir=None, encoder_dir=None,
        height=32, width=32, steps=1, batch_size=1, guidance=7.5, scheduler="ddim", seed=0,
        repeat=1, warmup=1, threads=1, device="cpu",
    )  # fmt: skip


def test_a_hung_worker_is_killed_at_its_timeout(tmp_path, hang_module, monkeypatch):
    monkeypatch.setitem(protocol.WORKER_MODULES, "trt", hang_module)
    t0 = time.perf_counter()
    raw = spawn_worker(_spec("trt", tmp_path), tmp_path, threads=1, timeout=3)
    took = time.perf_counter() - t0
    assert raw["status"] == "error" and raw["timed_out"] is True
    assert "timed out after 3 s" in raw["reason"] and "hanging in a CUDA call" in raw["reason"]
    assert took < 60  # not the worker's 120 s


def test_results_are_on_disk_after_each_backend(tmp_path, hang_module, monkeypatch):
    """ort measures, then trt hangs: while trt hangs the JSON already holds ort's result;
    at the end trt is reported as timed out and the document is complete."""
    out, seen = tmp_path / "bench.json", tmp_path / "seen.json"
    monkeypatch.setitem(protocol.WORKER_MODULES, "trt", hang_module)
    monkeypatch.setenv("HANG_OUT", str(out))
    monkeypatch.setenv("HANG_SEEN", str(seen))
    cfg = BenchConfig(
        arch="toy", backends=("ort", "trt"), steps=1, repeat=1, threads=1, device="cpu",
        timeout="trt=5,300",
    )  # fmt: skip
    doc = run_bench(cfg, log=lambda _m: None, out=str(out))
    partial = json.loads(seen.read_text())
    assert partial["complete"] is False and [r["backend"] for r in partial["results"]] == ["ort"]
    assert partial["skipped"] == []
    final = json.loads(out.read_text())
    assert final == json.loads(json.dumps(doc)) and final["complete"] is True
    assert [r["backend"] for r in final["results"]] == ["ort"]
    (skip,) = final["skipped"]
    assert skip["backend"] == "trt" and skip["timed_out"] and skip["error"]
    assert final["config"]["timeout_s"] == {"ort": 300, "trt": 5}
    assert final["results"][0]["precision"] == {
        "text_encoder": "fp32", "unet": "fp32", "vae_decoder": "fp32"
    }  # fmt: skip


def test_unequal_precisions_are_named_and_both_vae_timings_reported():
    prec = {"text_encoder": "fp16", "unet": "fp16"}
    results = [
        {"backend": "torch", "precision": {**prec, "vae_decoder": "fp16"},
         "vae_decode_by_precision": {"fp16": 0.05, "fp32": 0.09}},
        {"backend": "ort", "precision": {**prec, "vae_decoder": "fp32"}},
        {"backend": "trt", "precision": {**prec, "vae_decoder": "fp16"}},
    ]  # fmt: skip
    notes = precision_notes(results)
    assert notes[0] == ("ort runs vae_decoder in fp32 (torch: fp16): not like for like with torch.")
    assert notes[1] == "torch: VAE decode by precision (median): fp16 0.05 s, fp32 0.09 s."
    assert len(notes) == 2  # trt matches torch


def test_fp16_vae_needs_fp16_and_has_its_own_cache_entry(tmp_path):
    with pytest.raises(ConfigError, match="--fp16-vae"):
        BenchConfig(fp16_vae=True).check()
    sources = Sources(tmp_path / "m", tmp_path / "sd", tmp_path / "enc")
    assert "--fp16-vae" in export_args(BenchConfig(fp16=True, fp16_vae=True), sources)
    assert "--no-fp16-vae" in export_args(BenchConfig(fp16=True), sources)
