"""Benchmark: build the fp16 UNet TensorRT engine of SD 1.5 (or the tiny test UNet) on a machine
without a GPU.

    nice -n 10 python bench/engine_sd15.py [--arch sd15|tiny] [--work DIR] [--reexport] [--out F]

1. ONNX (child process, torch + the export stage): a ``UNet2DConditionModel`` from the arch's
   config (``iap_rt.train.sd15.SD15_UNET`` / ``iap_rt.train.tiny.TINY_UNET``) with random
   weights (seed 0), attention in the fusable form, ``half()``, dynamo export at opset 18 and
   cleanup through the export stage's own steps (``iap_rt.export.exporter.dynamo_export`` +
   ``finish_onnx``) to ``WORK/unet.onnx`` (+ ``.data``). Kept between runs unless
   ``--reexport``.
2. Engine (child process, no torch): ``iap_rt.engines.build.build_engine`` with TensorRT-RTX,
   the default static profile (guided batch 1 -> N=2, the arch's native size: 512x512 ->
   64x64 latents, 77x768 context for SD 1.5), the shape-contract check, and detailed layer
   information, whose dump in the verbose log shows which attentions became one fused kernel
   (``_gemm_mha_v2``); the engine is written to ``WORK``.

Each child reports its own wall time and peak RSS; the results go to
``bench/results/engine_<arch>.json`` (``--out``). Timings depend on what else runs on the
machine: the load average at the start is recorded with them. ``--arch tiny`` is the smoke
test's size (seconds); ``sd15`` needs ~9 GB of memory and minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# arch -> what the export child builds and what the engine is built for
ARCHS = {
    "sd15": {"text_max_length": 77, "image_size": 512, "title": "SD 1.5"},
    "tiny": {"text_max_length": 32, "image_size": 64, "title": "tiny test"},
}


def unet_config(arch: str) -> dict:
    """The UNet architecture of ``arch`` (diffusers ``UNet2DConditionModel`` fields)."""
    if arch == "sd15":
        from iap_rt.train.sd15 import SD15_UNET

        return SD15_UNET
    from iap_rt.train.tiny import TINY_UNET

    return TINY_UNET


def model_dims(arch: str):
    """The shape-contract sizes of ``arch``'s UNet (``iap_rt.specs.ModelDims``)."""
    from iap_rt.specs import ModelDims

    unet = unet_config(arch)
    return ModelDims(
        text_max_length=ARCHS[arch]["text_max_length"],
        cross_attention_dim=unet["cross_attention_dim"],
        latent_multiple=2 ** (len(unet["block_out_channels"]) - 1),
    )


def export_child(arch: str, work: Path) -> dict:
    """Step 1, in its own process: the fp16 UNet ONNX."""
    import resource

    import torch
    from diffusers import UNet2DConditionModel

    from iap_rt.export.attention import make_attention_fusable
    from iap_rt.export.exporter import dynamo_export, finish_onnx
    from iap_rt.export.networks import EXPORT_CONFIGS

    dims = model_dims(arch)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**unet_config(arch)).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    n_attn = make_attention_fusable(unet)
    cfg = EXPORT_CONFIGS["unet"].for_downsamples(dims.unet_downsamples)
    module = cfg.wrapper(unet).eval()
    del unet
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = work / "unet.onnx"
    raw = dynamo_export(module, cfg, dims, "fp16", path, 18, vocab_size=100)
    del module  # before the ONNX copy of the weights is loaded
    files, facts = finish_onnx(raw, path, cfg)
    return {
        "params": n_params,
        "attention_modules": n_attn,
        "model_init_s": round(t_model, 1),
        "export_s": round(time.perf_counter() - t0, 1),
        "onnx_bytes": sum(f.stat().st_size for f in files),
        "onnx_files": [f.name for f in files],
        "attention": facts["attention"],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def build_child(arch: str, work: Path) -> dict:
    """Step 2, in its own process: the engine with TensorRT-RTX (no torch)."""
    import resource

    import tensorrt_rtx as trt

    from iap_rt.engines.build import BuildOptions, build_engine
    from iap_rt.engines.config import EngineConfig
    from iap_rt.fileio import write_bytes_atomic
    from iap_rt.specs import UNET

    if "torch" in sys.modules:
        raise SystemExit("the engine build must not import torch (it works from ONNX only)")
    dims = model_dims(arch)
    cfg = EngineConfig().checked(dims, ARCHS[arch]["image_size"])
    profile = cfg.profile(UNET, dims)
    label = profile.pop("label")
    log: list[str] = []
    t0 = time.perf_counter()
    options = BuildOptions(detailed_profile=True)
    built = build_engine(
        trt, work / "unet.onnx", UNET, "fp16", dims, profile, options, verbose_log=log
    )
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    plan = work / f"unet.{label}.plan"
    write_bytes_atomic(plan, built.plan)
    layers = built.layers or {}
    return {
        "trt_version": trt.__version__,
        "profile": label,
        "shapes": profile["shapes"],
        "io": built.io,
        "build_s": round(built.seconds, 1),
        "parse_and_build_s": round(total, 1),
        "peak_rss_gb": round(rss, 2),
        "engine_bytes": plan.stat().st_size,
        "build_options": options.record(),
        "engine_layers": layers.get("layers"),
        "fused_attention_layers": layers.get("fused_attention"),
        "fused_attention_examples": layers.get("fused_attention_names", [])[:3],
    }


def _child(step: str, arch: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--arch", arch, "--work", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"{step} failed (exit {r.returncode})")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    ap.add_argument("--work", type=Path, help="ONNX and engine folder [/tmp/iap_ARCH]")
    ap.add_argument("--reexport", action="store_true", help="redo the ONNX export")
    ap.add_argument("--out", type=Path, help="result JSON [bench/results/engine_ARCH.json]")
    ap.add_argument("--child", choices=("export", "build"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.work = args.work or Path(f"/tmp/iap_{args.arch}")
    args.out = args.out or RESULTS / f"engine_{args.arch}.json"
    if args.child:
        fn = export_child if args.child == "export" else build_child
        print(json.dumps(fn(args.arch, args.work)))
        return

    from iap_rt.fileio import write_text_atomic

    args.work.mkdir(parents=True, exist_ok=True)
    result = {
        "what": f"{ARCHS[args.arch]['title']} UNet (random weights from the config), fp16 ONNX "
        "-> TensorRT-RTX engine on a machine without a GPU",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "nice": os.nice(0),
            "gpu": None,
        },
    }
    if args.reexport or not (args.work / "unet.onnx").is_file():
        print(f"1/2 exporting the fp16 {args.arch} UNet ONNX ...", flush=True)
        result["export"] = _child("export", args.arch, args.work)
    else:  # keep the numbers of the run that exported it
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result["export"] = {**previous.get("export", {}), "reused_from": previous.get("date")}
    print("2/2 building the TensorRT-RTX engine ...", flush=True)
    result["engine"] = e = _child("build", args.arch, args.work)
    # every attention of the ONNX (export's graph check) should be one fused engine layer
    e["onnx_attentions"] = result["export"].get("attention", {}).get("total")
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(
        f"engine {e['profile']}: build {e['build_s']} s, peak RSS {e['peak_rss_gb']} GB, "
        f"{e['engine_bytes'] / 2**30:.2f} GiB, fused attention "
        f"{e['fused_attention_layers']}/{e['onnx_attentions']} -> {args.out}"
    )


if __name__ == "__main__":
    main()
