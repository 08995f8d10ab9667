"""The rules the GPU check measures by, on the CPU: a retry keeps only a stage in which nothing
failed (``bench/gpu_check.py done``); ``iap-rt bench --deadline`` cuts every worker to the time
left and skips a backend once it has passed; ``--also-steps`` measures more step counts with
the backend already loaded and ``--keep-outputs`` keeps each backend's final latents and
images (the real ORT worker on the embedded toy model); a failed worker's result carries its
output, not one line."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from iap_rt.bench import protocol
from iap_rt.bench.config import BenchConfig
from iap_rt.bench.run import run_bench
from iap_rt.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def stage(tmp_path, **doc) -> Path:
    path = tmp_path / "gpu_stage.json"
    path.write_text(json.dumps({"complete": True, "results": [], "skipped": [], **doc}))
    return path


@pytest.mark.parametrize(
    "doc, final, why",
    [
        ({}, True, "final"),
        ({"complete": False}, False, "incomplete"),
        ({"errors": ["unet call: RuntimeError: CUDA error"]}, False, "CUDA error"),
        # a backend that errored or timed out is measured again on the retry ...
        (
            {
                "skipped": [
                    {
                        "backend": "torch",
                        "reason": "exit code 1: No module named 'x'",
                        "error": True,
                    }
                ]
            },
            False,
            "torch: exit code 1",
        ),  # fmt: skip
        (
            {
                "skipped": [
                    {
                        "backend": "torch-compile",
                        "reason": "timed out after 5 s",
                        "error": True,
                        "timed_out": True,
                    }
                ]
            },
            False,
            "timed out",
        ),  # fmt: skip
        (
            {
                "skipped": [
                    {"backend": "ort", "reason": "the bench's deadline passed", "deadline": True}
                ]
            },
            False,
            "deadline",
        ),  # fmt: skip
        # ... one that cannot run on this machine is a final answer
        (
            {"skipped": [{"backend": "ort-graph", "reason": "needs CUDA", "error": False}]},
            True,
            "final",
        ),  # fmt: skip
    ],
)
def test_a_retry_keeps_only_a_stage_in_which_nothing_failed(tmp_path, doc, final, why):
    done, reason = gpu_check.stage_done(stage(tmp_path, **doc))
    assert done is final and why in reason
    assert gpu_check.stage_done(tmp_path / "missing.json") == (False, "no result yet")


def test_also_steps_parse_and_refuse():
    assert BenchConfig(steps=30, also_steps="50").more_steps() == [50]
    assert BenchConfig(steps=30, also_steps="30, 50,50,10").more_steps() == [50, 10]
    assert BenchConfig().more_steps() == []
    for bad in ("fifty", "0", "-5"):
        with pytest.raises(ConfigError, match="--also-steps item"):
            BenchConfig(also_steps=bad).check()


def test_a_passed_deadline_skips_every_backend_without_starting_one(tmp_path):
    cfg = BenchConfig(arch="toy", backends=("ort", "ort-graph"), deadline=time.time() - 3)
    doc = run_bench(cfg, log=lambda m: None, out=tmp_path / "b.json")
    assert doc["results"] == [] and [s["backend"] for s in doc["skipped"]] == ["ort", "ort-graph"]
    assert all(s["deadline"] and "deadline passed" in s["reason"] for s in doc["skipped"])
    assert gpu_check.stage_done(tmp_path / "b.json")[0] is False


def test_more_step_counts_and_kept_outputs_from_one_loaded_worker(tmp_path):
    keep = tmp_path / "keep"
    cfg = BenchConfig(arch="toy", backends=("ort",), steps=2, also_steps="3", repeat=2,
                      threads=1, device="cpu", keep_outputs=str(keep),
                      deadline=time.time() + 300)  # fmt: skip
    doc = run_bench(cfg, log=lambda m: None)
    (r,) = doc["results"]
    assert sorted(r["by_steps"]) == ["2", "3"] and r["samples"]["unet_step_s"] == 2 * 2
    three = r["by_steps"]["3"]
    assert three["samples"] == {"e2e_s": 2, "unet_step_s": 2 * 3}
    assert three["unet_step_spread"][0] <= three["unet_step_s"] <= three["unet_step_spread"][1]
    assert len(r["runs_by_steps"]["3"][0]["unet_s"]) == 3
    latents, images = np.load(keep / "ort.latents.npy"), np.load(keep / "ort.images.npy")
    assert images.dtype == np.uint8 and images.ndim == 4 and latents.ndim == 4
    assert r["iap_rt"] == str(Path(protocol.__file__).resolve().parents[1])
    assert doc["config"]["also_steps"] == [3]


def test_a_failed_worker_brings_back_its_output(tmp_path, monkeypatch):
    (tmp_path / "crash_worker.py").write_text(
        "import sys\nfor i in range(30):\n    print(f'frame {i}', file=sys.stderr)\n"
        "raise RuntimeError('the real cause, deep in a traceback')\n"
    )  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setitem(protocol.WORKER_MODULES, "ort", "crash_worker")
    spec_ = protocol.WorkerSpec(
        backend="ort", model_dir=str(tmp_path), base_dir=None, encoder_dir=None, height=32,
        width=32, steps=1, batch_size=1, guidance=7.5, scheduler="ddim", seed=0, repeat=1,
        warmup=1, threads=1, device="cpu",
    )  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    raw = protocol.spawn_worker(spec_, work, 1, timeout=60)
    assert raw["status"] == "error" and "the real cause" in raw["reason"]
    assert "frame 0" in raw["log"] and "Traceback" in raw["log"]  # the whole output's tail
