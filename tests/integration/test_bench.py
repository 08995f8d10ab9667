"""``iap-rt bench --arch tiny`` end to end: torch reference and ORT runtime in their own
subprocesses, JSON layout as issue 7 specifies, every figure positive and finite.

The cache is pre-filled from the session's tiny model (so the three exports are not paid a
second time); everything after that is the real command.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from iap_rt.benchmark import RESULT_FIELDS, TIMING_FIELDS, check_document
from iap_rt.cli import main


@pytest.fixture
def bench_cache(tmp_path, tiny_sd_dir, tiny_encoder_dir, tiny_model_dir):
    """A bench cache holding the session's tiny model, laid out as ``build_arch`` writes it."""
    root = tmp_path / "cache" / "tiny-seed0"
    for src, sub in ((tiny_sd_dir, "sd"), (tiny_encoder_dir, "encoder")):
        shutil.copytree(src, root / sub)
        (root / sub / ".complete").write_text("layout 1\n")
    shutil.copytree(tiny_model_dir, root / "model-fp32")
    return tmp_path / "cache"


def _numbers(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def test_bench_tiny_json(bench_cache, tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(
        [
            "bench",
            "--arch",
            "tiny",
            "--steps",
            "2",
            "--repeat",
            "1",
            "--threads",
            "1",
            "--cache-dir",
            str(bench_cache),
            "--out",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    doc = json.loads(out.read_text("utf-8"))

    assert check_document(doc) == []
    assert set(doc) >= {"machine", "config", "results"}
    c = doc["config"]
    assert (c["arch"], c["height"], c["width"], c["steps"], c["batch_size"], c["repeat"]) == (
        "tiny",
        64,
        64,
        2,
        1,
        1,
    )
    assert c["unet_batch"] == 2  # guidance on: negative + positive prompt
    assert c["model_build_s"] is None  # the cache was used, nothing rebuilt
    m = doc["machine"]
    assert m["cpu"] and m["cores"] >= 1 and "onnxruntime" in m["versions"]

    by_backend = {r["backend"]: r for r in doc["results"]}
    assert set(by_backend) >= {"torch", "ort"}, doc.get("skipped")
    for r in by_backend.values():
        for key in RESULT_FIELDS:
            assert key in r
        for key in (*TIMING_FIELDS, "cold_start_s", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["backend"], key, r[key])
        assert r["samples"]["unet_step_s"] == 2  # 2 steps x 1 run
        assert r["speedup_vs_torch"]["unet_step"] > 0
    assert by_backend["torch"]["speedup_vs_torch"] == {
        "unet_step": 1.0,
        "e2e": 1.0,
        "unet_step_cpu": 1.0,
    }
    assert by_backend["ort"]["unet_graph"] == "unet.onnx"  # tiny: no fused variant (auto)
    # the same inputs and algorithm: the runtime's final latents equal the reference's
    assert by_backend["ort"]["latents_max_abs_diff_vs_torch"] < 1e-3
    for path, v in _numbers(doc):
        assert math.isfinite(v) and v >= 0, (path, v)

    # trt, ort-graph: a result where a GPU (+ engines, + onnxruntime-gpu) exists, otherwise
    # listed with the reason
    skipped = {s["backend"]: s for s in doc["skipped"]}
    assert "trt" in by_backend or "trt" in skipped
    if "ort-graph" in by_backend:
        assert set(by_backend["ort-graph"]["cuda_graph"]) == {"text_encoder", "unet", "vae_decoder"}
    else:
        assert "CUDA execution provider" in skipped["ort-graph"]["reason"]
        assert not skipped["ort-graph"]["error"]
    assert "UNet/step" in table and "ort" in table
