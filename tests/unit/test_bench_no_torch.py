"""``iap-rt bench`` without torch: the parent and the runtime worker on the embedded toy model
with torch made unimportable, the worker protocol's failure paths, and the statistics and
report functions on a real worker's output."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from iap_rt.bench.command import _command_line
from iap_rt.bench.config import BenchConfig
from iap_rt.bench.protocol import WorkerSpec, spawn_worker
from iap_rt.bench.report import RESULT_FIELDS, check_document, format_table
from iap_rt.bench.stats import add_ratios, summarise
from iap_rt.errors import ConfigError
from iap_rt.modeldir import default_model_dir

BLOCKED = ("torch", "diffusers", "transformers", "accelerate")


@pytest.fixture(scope="module")
def no_torch_path(tmp_path_factory):
    """A PYTHONPATH entry whose torch, diffusers, transformers and accelerate fail to import."""
    root = tmp_path_factory.mktemp("blocked")
    for name in BLOCKED:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked in this test')\n"
        )
    return root


@pytest.fixture(scope="module")
def toy_bench(no_torch_path, tmp_path_factory):
    """``iap-rt bench --arch toy`` in a process (and its workers) where torch cannot load."""
    out = tmp_path_factory.mktemp("bench") / "toy.json"
    cmd = [sys.executable, "-m", "iap_rt.cli", "bench", "--arch", "toy", "--backends"]
    cmd += ["torch,ort,ort-graph", "--steps", "2", "--repeat", "2", "--threads", "1"]
    cmd += ["--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(no_torch_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return proc, out


def test_bench_parent_and_runtime_worker_run_without_torch(toy_bench):
    proc, out = toy_bench
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text("utf-8"))
    assert check_document(doc) == []
    (ort,) = doc["results"]
    assert ort["backend"] == "ort" and ort["device"] == "cpu"
    assert ort["samples"]["unet_step_s"] == 4  # 2 steps x 2 runs
    assert ort["unet_graph"] == "unet.onnx" and ort["speedup_vs_torch"] is None
    skipped = {s["backend"]: s for s in doc["skipped"]}
    # torch missing: the reference is unavailable (not an error), and says what to install
    assert not skipped["torch"]["error"] and "iap-rt[export]" in skipped["torch"]["reason"]
    assert "is blocked in this test" in skipped["torch"]["reason"]
    assert not skipped["ort-graph"]["error"]
    assert "CUDA execution provider" in skipped["ort-graph"]["reason"]
    c = doc["config"]
    assert (c["arch"], c["height"], c["steps"], c["model_id"]) == ("toy", 32, 2, "toy2-zh-pivot")
    assert doc["command"].startswith("iap-rt bench --arch toy --steps 2")
    assert "ort" in proc.stdout and "torch: not run" in proc.stdout  # the table


def test_statistics_and_table_of_a_real_result(toy_bench):
    _, out = toy_bench
    doc = json.loads(out.read_text("utf-8"))
    raw = dict(doc["results"][0], loadavg=None, cold_start_s=1.0, peak_rss_mb=100.0)
    raw.update(load_s=0.5, first_image_s=0.5, import_s=0.1)
    entry = summarise(raw)
    steps = [s for r in raw["runs"] for s in r["unet_s"]]  # every step of every run
    assert entry["unet_step_s"] == statistics.median(steps)
    assert entry["spread"]["unet_step_s"] == [min(steps), max(steps)]
    assert entry["samples"] == {k: 4 if k == "unet_step_s" else 2 for k in entry["samples"]}
    # a torch entry twice as slow: speed-ups are torch time / backend time
    torch = dict(entry, backend="torch")
    torch.update({k: 2 * entry[k] for k in ("unet_step_s", "e2e_s", "unet_step_cpu_s")})
    results = [torch, dict(entry)]
    add_ratios(results, {})
    assert results[1]["speedup_vs_torch"]["unet_step"] == pytest.approx(2.0)
    assert results[0]["speedup_vs_torch"]["e2e"] == 1.0
    assert results[1]["latents_max_abs_diff_vs_torch"] is None  # no latents given
    table = format_table({**doc, "results": results})
    assert "2.00x" in table.splitlines()[3]  # title, header, torch, ort


def test_check_document_names_what_is_wrong():
    doc = {"config": {"arch": "tiny"}, "results": [{"backend": "ort", "e2e_s": 0.0}]}
    problems = check_document(doc)
    assert "missing top-level key 'machine'" in problems
    assert "config lacks 'steps'" in problems
    assert "result ort: e2e_s = 0.0 is not > 0" in problems
    assert "result ort lacks 'unet_step_s'" in problems
    assert len([p for p in problems if p.startswith("result ort lacks")]) == len(RESULT_FIELDS) - 2


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"arch": "big"}, "tiny, toy, sd15"),
        ({"backends": ("ort", "tensorflow")}, "torch,torch-compile,ort,ort-graph,trt"),
        ({"steps": 0}, "--steps 1"),
        ({"threads": 0}, "--threads 1"),
        ({"base": "/x"}, "pass --model too"),
    ],
)
def test_config_errors_say_how_to_fix(kw, words):
    with pytest.raises(ConfigError) as e:
        BenchConfig(**kw).check()
    assert e.value.fix and words in str(e.value)


def test_command_line_reproduces_the_options():
    cfg = BenchConfig(arch="toy", steps=2, backends=("ort",), fp16=True, model="/m d")
    line = _command_line(cfg, "out.json")
    assert (
        line
        == "iap-rt bench --arch toy --steps 2 --backends ort --fp16 --model '/m d' --out out.json"
    )


def test_worker_failures_come_back_as_reasons(tmp_path):
    spec = WorkerSpec(
        backend="ort",
        model_dir=str(tmp_path / "missing"),
        base_dir=None,
        encoder_dir=None,
        height=32,
        width=32,
        steps=1,
        batch_size=1,
        guidance=7.5,
        scheduler="ddim",
        seed=0,
        repeat=1,
        warmup=1,
        threads=1,
        device="cpu",
    )
    raw = spawn_worker(spec, tmp_path, threads=1)
    assert raw["status"] == "error" and "missing" in raw["reason"]
    # the torch worker without PyTorch sources: unavailable, with the reason
    spec.backend, spec.model_dir = "torch", str(default_model_dir())
    raw = spawn_worker(spec, tmp_path, threads=1)
    assert raw["status"] == "unavailable" and "no PyTorch sources" in raw["reason"]


def test_ort_cpu_mha_script_on_the_embedded_model(model_copy, tmp_path):
    """bench/ort_cpu_mha.py at the toy model's size: both UNet graphs run, the rewrite is
    removed afterwards."""
    pytest.importorskip("onnx")
    out = tmp_path / "mha.json"
    script = Path(__file__).resolve().parents[2] / "bench" / "ort_cpu_mha.py"
    cmd = [sys.executable, str(script), "--model", str(model_copy), "--steps", "1"]
    cmd += ["--rounds", "1", "--threads", "1", "--side", "32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text("utf-8"))
    assert doc["attentions_fused"] > 0 and math.isfinite(doc["speedup"]) and doc["speedup"] > 0
    for name in ("as_exported", "fused_mha"):
        (run,) = doc["results"][name]["runs"]
        assert len(run["steps_s"]) == 1
    a, b = (doc["results"][n]["runs"][0]["checksum"] for n in ("as_exported", "fused_mha"))
    assert a == pytest.approx(b, rel=1e-4)  # the same outputs (sum of |x|)
    assert not (model_copy / "unet.ort.onnx").exists()
