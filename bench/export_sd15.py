"""Export the SD 1.5 architecture (random weights from its configs) and record time and memory.

    nice -n 10 python bench/export_sd15.py [--arch sd15|tiny] [--work DIR] [--jobs LIST]
                                           [--out bench/results/export_ARCH.json]

Builds (once, cached in ``--work``) an SD 1.5-shaped pipeline directory (UNet 860M, VAE) and a
bert-base-chinese-sized Chinese encoder (12 x 768, CLIP-L-sized) with the configs in
``iap_rt.train.sd15`` (``--arch tiny``: the test models of ``iap_rt.train.tiny``, for the
smoke test), then runs ``iap-rt export`` one network per child process, so each network's
wall time and peak RSS are its own (``--jobs``, default all):

- fp32: text_encoder, unet (external data: > 2 GB), vae_decoder;
- fp16: text_encoder, unet (the VAE stays fp32 under --fp16).

With TensorRT-RTX installed and the fp16 UNet among the jobs it also builds that UNet once (no
GPU needed, static guided batch at the native size) and counts the attentions TensorRT fused
into ``_gemm_mha`` kernels. Results go to one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = ("sd15", "tiny")
JOBS = [
    ("fp32", "text_encoder"),
    ("fp32", "unet"),
    ("fp32", "vae_decoder"),
    ("fp16", "text_encoder"),
    ("fp16", "unet"),
]


# ---- children (import torch) --------------------------------------------------------------------


def child_build(work: Path, arch: str) -> dict:
    from iap_rt.fileio import write_text_atomic

    if arch == "sd15":
        from iap_rt.train.sd15 import make_sd15, make_sd15_encoder

        make_sd15(work / "sd", seed=0, text_encoder=False)
        make_sd15_encoder(work / "encoder", seed=0)
    else:
        from iap_rt.train.tiny import make_tiny_encoder, make_tiny_sd

        make_tiny_sd(work / "sd", seed=0)
        make_tiny_encoder(work / "encoder", seed=0)
    write_text_atomic(work / ".complete", f"{arch} seed 0\n")
    return {}


def child_export(work: Path, precision: str, network: str, arch: str) -> dict:
    from iap_rt.export.stage import export_model_dir

    out = export_model_dir(
        work / "sd",
        work / "encoder",
        work / f"model-{precision}",
        model_id=f"{arch}-random-{precision}",
        fp16=precision == "fp16",
        networks=[network],
        force=True,
        echo=lambda s: print(s, file=sys.stderr, flush=True),
    )
    from iap_rt.modeldir import read_manifest

    return read_manifest(out)["networks"][network]


def child_trt_fusion(onnx_path: Path) -> dict:
    """Build a static TensorRT-RTX engine (N=2, the model's native size) and count fused
    attentions."""
    import tensorrt_rtx as trt

    from iap_rt.engines.build import fused_softmaxes
    from iap_rt.modeldir import ModelDir

    model = ModelDir.open(onnx_path.parent, networks=("unet",))
    d, side = model.dims, int(model.manifest.get("image_size", 512)) // model.dims.vae_scale_factor
    shapes = {
        "sample": (2, d.latent_channels, side, side),
        "timestep": (2,),
        "encoder_hidden_states": (2, d.text_max_length, d.cross_attention_dim),
    }
    try:
        report = fused_softmaxes(trt, onnx_path, lambda name, dims: shapes[name])
    except Exception as e:  # EngineBuildError: the parser's message goes into the result
        return {"error": str(e)}
    return {
        "trt_rtx_version": trt.__version__,
        "engine_built": report.engine_bytes is not None,
        "engine_bytes": report.engine_bytes,
        "build_s": round(report.build_s, 1),
        "profile": f"static N=2, {side}x{side} latents, "
        f"{d.text_max_length}x{d.cross_attention_dim} context",
        "softmax": len(report.softmax),
        "fused_into_gemm_mha": len(report.fused),
    }


# ---- parent (no torch) --------------------------------------------------------------------------


def run_child(args: list[str], threads: int, timeout: float) -> dict:
    """Run this script as a child; return its JSON result + wall time and peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:  # the child's stderr went to ours
        return {"error": f"exit code {proc.returncode}", "wall_s": round(wall, 1)}
    result = json.loads(out.decode().strip().splitlines()[-1])  # peak RSS measured inside
    result["wall_s"] = round(wall, 1)
    return result


def child_main(argv: list[str]) -> None:
    import resource

    kind, *rest = argv
    if kind == "build":
        result = child_build(Path(rest[0]), rest[1])
    elif kind == "export":
        result = child_export(Path(rest[0]), rest[1], rest[2], rest[3])
    elif kind == "trt":
        result = child_trt_fusion(Path(rest[0]))
    else:
        raise SystemExit(f"unknown child {kind}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_gb"] = round(peak_kb / 2**20, 2)
    print(json.dumps(result), flush=True)


def summarize(precision: str, network: str, r: dict) -> dict:
    if "error" in r:
        return {"precision": precision, "network": network, **r}
    rows = r["validation"]
    worst = max(rows, key=lambda x: x["max_abs_diff"])
    return {
        "precision": precision,
        "network": network,
        "wall_s": r["wall_s"],
        "export_s": r["export_s"],
        "validate_s": r["validate_s"],
        "peak_rss_gb": r["peak_rss_gb"],
        "onnx_bytes": r["bytes"],
        "external_data_bytes": r.get("data_bytes"),
        "total_gb": round((r["bytes"] + (r.get("data_bytes") or 0)) / 1e9, 3),
        "nodes": r["nodes"],
        "attention": r["attention"],
        "validation": [
            {k: row[k] for k in ("case", "max_abs_diff", "reference_absmax", "tolerance")}
            for row in rows
        ],
        "max_abs_diff_vs_torch_fp32": worst["max_abs_diff"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="sd15")
    ap.add_argument("--work", type=Path, help="models and exports [/tmp/iap-rt-bench-ARCH]")
    ap.add_argument("--jobs", help="comma list of PRECISION:NETWORK [all: " + ",".join(
        f"{p}:{n}" for p, n in JOBS) + "]")  # fmt: skip
    ap.add_argument("--out", type=Path, help="result JSON [bench/results/export_ARCH.json]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-trt", action="store_true", help="skip the TensorRT-RTX fusion check")
    args = ap.parse_args(argv)
    jobs = JOBS
    if args.jobs:
        jobs = [tuple(j.strip().split(":", 1)) for j in args.jobs.split(",") if j.strip()]
        unknown = [j for j in jobs if j not in JOBS]
        if unknown or not jobs:
            ap.error(f"--jobs: unknown {unknown}; choose from {JOBS}")
    work = (args.work or Path(f"/tmp/iap-rt-bench-{args.arch}")).absolute()
    out_file = args.out or RESULTS / f"export_{args.arch}.json"
    work.mkdir(parents=True, exist_ok=True)
    from iap_rt.fileio import write_json_atomic

    results: dict = {
        "what": f"iap-rt export of the {args.arch} architecture with random weights (configs in "
        f"iap_rt/train/{args.arch}.py); one child process per network",
        "machine": {
            "cpus": os.cpu_count(),
            "omp_threads": args.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if not (work / ".complete").is_file():
        print(f"building the {args.arch} directories ...", flush=True)
        build = run_child(["build", str(work), args.arch], args.threads, args.timeout)
        results["build"] = build
    jobs_done = []
    for precision, network in jobs:
        print(f"exporting {network} {precision} ...", flush=True)
        r = run_child(
            ["export", str(work), precision, network, args.arch], args.threads, args.timeout
        )
        row = summarize(precision, network, r)
        print(json.dumps({k: row.get(k) for k in ("wall_s", "peak_rss_gb", "total_gb")}))
        jobs_done.append(row)
    results["jobs"] = jobs_done
    from iap_rt.modeldir import network_file, read_manifest

    manifest = (
        read_manifest(work / f"model-{jobs[0][0]}")
        if (work / f"model-{jobs[0][0]}").is_dir()
        else None
    )
    if manifest:
        results["versions"] = manifest.get("tool_versions")
    if not args.no_trt and ("fp16", "unet") in jobs:
        import importlib.util

        if importlib.util.find_spec("tensorrt_rtx") is not None:
            print("TensorRT-RTX fusion check on the fp16 UNet ...", flush=True)
            onnx_path = work / "model-fp16" / network_file("unet")
            results["trt_rtx_fp16_unet"] = run_child(
                ["trt", str(onnx_path)], args.threads, args.timeout
            )
    write_json_atomic(out_file, results)
    print(f"wrote {out_file}")
    failed = [f"{r['precision']}:{r['network']}" for r in jobs_done if "error" in r]
    if "error" in results.get("trt_rtx_fp16_unet", {}):
        failed.append("trt fusion check")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see {out_file})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
