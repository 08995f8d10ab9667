"""``bench/gpu_check.sh --dry-run`` rehearses the device check on the CPU with the device's
install path: a Python that sees no editable install of the project (as on the GPU machine,
where nothing of it is installed), the project copied into a site as pyproject lays it out, a
stand-in archive carried in two checksummed parts over two "calls", the background build and
export of the bench model, and every measuring stage (CPU providers, the tiny model), each
writing its result; a "fresh machine" must stop call 2 with one loud line, and a retry keeps
the final stages and redoes the one whose backend failed. Every process that measured imported
``iap_rt`` from the installed site, never from the checkout the script runs in.

The second test pins the bug that made the torch baseline unimportable on the device: a bench
started from a checkout's root (``python -m`` puts the working directory first on sys.path)
with a non-editable install gave its workers the checkout's ``iap_rt/``, which has no
``train``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from iap_rt.bench.sources import cache_root

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["gpu_evidence.json", "gpu_sd15.json", "gpu_sd15_compile.json", "gpu_toy.json"]


def test_gpu_check_dry_run_rehearses_every_stage(
    request, tmp_path, tiny_encoder_dir, tiny_model_dir
):
    cache = tmp_path / "cache"
    root = cache_root(cache, "tiny")  # pre-filled: the export is not paid twice; sd/ is built
    shutil.copytree(tiny_encoder_dir, root / "encoder")
    (root / "encoder" / ".complete").write_text("layout 1\n")
    shutil.copytree(tiny_model_dir, root / "model-fp32")
    env = {**os.environ, "GPU_CHECK_CACHE": str(cache), "GPU_CHECK_COMPILE_CAP": "5"}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    out = Path(r.stdout.split("dry run: results in ")[1].split()[0])
    request.addfinalizer(lambda: shutil.rmtree(out.parents[1], ignore_errors=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_check.log", "gpu_export.log", *STAGES]
    )
    site = out.parent / "site"
    log = (out / "gpu_check.log").read_text()
    # the fresh machine: one loud line, nothing run
    assert r.stderr.count("GPU CHECK STOPPED: call 2 found no state of call 1") == 1
    assert "parts on this machine: ort.1 ort.2" in log and "onnxruntime-gpu unpacked" in log
    assert "project (copied, non-editable) and wheels installed" in log
    assert (site / "gpucheck_wheel" / "__init__.py").is_file()  # call 1's wheel, pip-installed
    assert (out.parent / "ort" / "gpucheck_stand_in" / "payload").stat().st_size == 2_000_000
    # every process that measured imported iap_rt from the site, never from the checkout
    docs = {name: json.loads((out / name).read_text()) for name in STAGES}
    export = json.loads((out.parent / "state" / "export.json").read_text())
    assert export["status"] == "done" and export["iap_rt"] == str(site / "iap_rt")
    assert (
        docs["gpu_toy.json"]["iap_rt"]
        == docs["gpu_evidence.json"]["iap_rt"]
        == str(site / "iap_rt")
    )
    sd = docs["gpu_sd15.json"]
    assert [x["backend"] for x in sd["results"]] == ["torch", "ort"]
    assert all(x["iap_rt"] == str(site / "iap_rt") for x in sd["results"])
    assert sd["skipped"][0]["backend"] == "ort-graph" and not sd["skipped"][0]["error"]
    # 2 steps and --also-steps 3, each measured with the loaded backend
    assert all(sorted(x["by_steps"]) == ["2", "3"] for x in sd["results"])
    assert sd["results"][1]["latents_max_abs_diff_vs_torch"] < 1e-3
    assert sd["results"][1]["pixels_mean_abs_diff_vs_torch"] is not None
    assert sd["config"]["deadline"] > 0 and sd["machine"]["versions"]["iap-rt"] == "0.1.0"
    toy = docs["gpu_toy.json"]
    assert toy["device"] == "cpu" and toy["cpu"]["cold_start_s"] > 0 and not toy["errors"]
    assert toy["latents_vs_cpu"]["ok"] and "CPUExecutionProvider" in toy["providers"]
    ev = docs["gpu_evidence.json"]
    assert not ev["errors"] and ev["unet_call"]["exported"]["vs_torch_fp32"]["ok"]
    assert ev["unet_call"]["exported"]["profile"]["nodes_on_cpu"] > 0  # the profile was read
    assert ev["outputs_vs_torch"]["ort"]["ok"] and ev["outputs_vs_torch"]["ort"]["pixels_ok"]
    # torch.compile on a CPU outruns its 5 s: not final, so the retry runs it again
    compiled = docs["gpu_sd15_compile.json"]
    assert compiled["skipped"][0]["timed_out"] and compiled["results"] == []
    for stage in ("gpu_toy", "gpu_sd15", "gpu_evidence"):
        assert log.count(f"{stage}: final, kept") == 1, stage
    assert "gpu_sd15_compile: again (torch-compile: timed out" in log


def test_bench_workers_import_the_installed_iap_rt_from_a_checkout_root(
    tmp_path, tiny_sd_dir, tiny_encoder_dir, tiny_model_dir
):
    carry = [sys.executable, str(ROOT / "bench" / "gpu_carry.py")]
    py = subprocess.run([*carry, "devpython", str(tmp_path / "python")], check=True,
                        capture_output=True, text=True).stdout.strip()  # fmt: skip
    site = tmp_path / "site"
    subprocess.run([*carry, "install", str(ROOT), str(site)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    no_install = subprocess.run(
        [py, "-c", "import iap_rt"], cwd=tmp_path, env={**env, "PYTHONPATH": ""}
    )
    assert no_install.returncode != 0  # this Python has no editable install to fall back on
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [py, "-m", "iap_rt.cli", "bench", "--model", str(tiny_model_dir), "--base", str(tiny_sd_dir),
         "--encoder", str(tiny_encoder_dir), "--backends", "torch,ort", "--device", "cpu",
         "--steps", "1", "--repeat", "1", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert r.returncode == 0, [s.get("log") or s["reason"] for s in doc["skipped"]]
    assert [x["backend"] for x in doc["results"]] == ["torch", "ort"]
    assert all(x["iap_rt"] == str(site / "iap_rt") for x in doc["results"])
