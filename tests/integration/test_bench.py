"""``iap-rt bench --arch tiny`` end to end: torch reference and ORT runtime in their own
subprocesses, JSON layout as issue 7 specifies, every figure positive and finite.

The cache is pre-filled from the session's tiny model (so the three exports are not paid a
second time) except the diffusers base, which the bench's torch build process
(``python -m iap_rt.train.bench_torch build``) writes; everything after that is the real
command. The export step of a cold cache is ``iap-rt export`` with :func:`export_args`.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from iap_rt.bench.config import BenchConfig
from iap_rt.bench.report import RESULT_FIELDS, TIMING_FIELDS, check_document
from iap_rt.bench.sources import Sources, cache_root, export_args
from iap_rt.cli import main


@pytest.fixture
def bench_cache(tmp_path, tiny_encoder_dir, tiny_model_dir):
    """A bench cache holding the session's tiny encoder and model, laid out as the bench
    writes them, without the diffusers base ``sd/``."""
    root = cache_root(tmp_path / "cache", "tiny")
    shutil.copytree(tiny_encoder_dir, root / "encoder")
    (root / "encoder" / ".complete").write_text("layout 1\n")
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
    assert c["model_build_s"] > 0  # sd/ was built; the model directory was used
    assert (cache_root(bench_cache, "tiny") / "sd" / ".complete").is_file()
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


def test_bench_export_step_is_a_valid_export_command(tmp_path):
    """The export a cold cache runs parses as ``iap-rt export`` options with these values."""
    from iap_rt.export.cli import export

    sources = Sources(tmp_path / "model-fp16", tmp_path / "sd", tmp_path / "encoder")
    args = export_args(BenchConfig(arch="sd15", fp16=True), sources)
    assert args[0] == "export"
    params = export.make_context("export", args[1:]).params
    assert params["base"] == str(tmp_path / "sd") and params["out"] == str(tmp_path / "model-fp16")
    assert (params["fp16"], params["engines"], params["model_id"]) == (
        True,
        "none",
        "sd15-random-seed0",
    )
    params = export.make_context("export", export_args(BenchConfig(fp16=True), sources)[1:]).params
    assert params["fp16_vae"] is False
    cfg = BenchConfig(arch="sd15", fp16=True, fp16_vae=True)
    assert export.make_context("export", export_args(cfg, sources)[1:]).params["fp16_vae"] is True


def test_torch_vae_runs_at_the_requested_precision_and_is_timed_at_both(
    tiny_model_dir, tiny_sd_dir, tiny_encoder_dir
):
    """The torch reference decodes with a VAE in ``vae_dtype`` (the bench passes the model
    directory's VAE precision), and ``vae_decode_by_precision`` times fp16 and fp32 both,
    leaving the pipeline's own VAE as it was."""
    import numpy as np
    import torch

    from iap_rt.train.bench_torch import vae_decode_by_precision
    from iap_rt.train.torch_pipeline import TorchPipeline

    ref = TorchPipeline.from_dirs(
        tiny_model_dir, tiny_sd_dir, tiny_encoder_dir, vae_dtype=torch.float16
    )
    assert ref.dtype == torch.float32 and next(ref.unet.parameters()).dtype == torch.float32
    assert next(ref.vae.parameters()).dtype == torch.float16
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert ref.decode(torch.from_numpy(latents)).dtype == torch.float16
    times = vae_decode_by_precision(ref, latents, repeat=1)
    assert set(times) == {"fp16", "fp32"} and all(t > 0 for t in times.values())
    assert ref.vae_dtype == torch.float16 and next(ref.vae.parameters()).dtype == torch.float16
