"""``bench/gpu_check.sh --dry-run`` rehearses the device check on the CPU: a stand-in archive
carried in three checksummed parts over three "calls" (start, collect, collect + check),
assembled and installed, the project laid out without a build backend (the fallback for a
device python without setuptools), the background build of the bench model, and every measuring
stage (CPU providers, the tiny model), each writing its result; a retry measures nothing
again. The cache is pre-filled with the session's tiny model (the export is not paid twice);
the torch sources are built by the script's background step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from iap_rt.bench.sources import cache_root

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_rehearses_every_stage(
    request, tmp_path, tiny_encoder_dir, tiny_model_dir
):
    cache = tmp_path / "cache"
    root = cache_root(cache, "tiny")
    shutil.copytree(tiny_encoder_dir, root / "encoder")
    (root / "encoder" / ".complete").write_text("layout 1\n")
    shutil.copytree(tiny_model_dir, root / "model-fp32")
    # GPU_CHECK_INSTALL=copy: the fallback for a device python that cannot build the project
    env = {**os.environ, "GPU_CHECK_CACHE": str(cache), "T_COMPILE_DRY": "5",
           "GPU_CHECK_INSTALL": "copy"}  # fmt: skip
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = Path(r.stdout.split("dry run: results in ")[1].split()[0])
    request.addfinalizer(lambda: shutil.rmtree(out.parent, ignore_errors=True))  # its scratch root
    names = sorted(p.name for p in out.iterdir())
    assert names == ["check.log", "stage1.json", "stage2.json", "stage3.json",
                     "stage4_compile.json", "stage4_exported_unet.json"]  # fmt: skip
    log = (out / "check.log").read_text()
    assert "3 parts of" in log and "onnxruntime archive installed" in log
    assert log.count("collected 1 new part(s)") == 3
    assert "project installed by copying its packages" in log
    stage1 = json.loads((out / "stage1.json").read_text())
    assert stage1["device"] == "cpu" and stage1["cold_start_s"] > 0
    assert "CPUExecutionProvider" in stage1["providers"]
    stage2 = json.loads((out / "stage2.json").read_text())
    assert stage2["complete"] and [x["backend"] for x in stage2["results"]] == ["torch", "ort"]
    assert stage2["config"]["steps"] == 2
    stage3 = json.loads((out / "stage3.json").read_text())  # no CUDA graph on a CPU: said so
    assert stage3["results"] == [] and stage3["skipped"][0]["backend"] == "ort-graph"
    compile_ = json.loads((out / "stage4_compile.json").read_text())
    assert compile_["config"]["timeout_s"] == {"torch-compile": 5}
    # the retry: every stage already has its result
    for stage in ("stage1", "stage2", "stage3", "stage4_exported_unet", "stage4_compile"):
        assert f"{stage}: already measured" in r.stderr
