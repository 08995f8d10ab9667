"""Benchmark: the exported UNet on ONNX Runtime's CPU provider, as exported vs fused attention.

    python bench/ort_cpu_mha.py [--model DIR] [--steps 5] [--rounds 2] [--threads 2]

``DIR`` defaults to the SD 1.5 benchmark model ``iap-rt bench --arch sd15`` builds (random
weights; latency does not depend on them). ``iap_rt.export.ortfuse.fuse_attention_for_ort``
writes ``unet.ort.onnx`` beside ``unet.onnx`` (graph only; same external data), then each
variant runs in its own subprocess (so peak RSS is its own), alternating ``--rounds`` times:
one UNet call with guidance (batch 2, 64x64 latents, 77x768 context), 1 warm-up + ``--steps``
timed calls on the contract's seeded dummy inputs, with the runtime's own session options
(``OrtBackend.session_options``). Writes
``bench/results/ort_cpu_mha_sd15.json``; the rewritten file is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = r"""
import json, os, resource, sys, time
import numpy as np, onnxruntime as ort
from iap_rt.backends.ort import OrtBackend
from iap_rt.modeldir import ModelDir
from iap_rt.specs import NETWORKS
path, steps, threads, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
so = OrtBackend("cpu", threads=threads).session_options()  # the runtime's own settings
t0 = time.perf_counter()
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t0
dims = ModelDir.open(os.path.dirname(path)).dims
feed = NETWORKS["unet"].dummy_inputs(dims, "fp32", {"N": 2, "h": side, "w": side})
times = []
for _ in range(steps + 1):
    t0 = time.perf_counter(); out = s.run(None, feed)[0]; times.append(time.perf_counter() - t0)
print(json.dumps({"load_s": load, "first_s": times[0], "steps_s": times[1:],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "checksum": float(np.abs(out).sum())}))
"""


def main(argv: list[str] | None = None) -> int:
    from iap_rt.bench.machine import machine_info
    from iap_rt.bench.sources import cache_root
    from iap_rt.export.ortfuse import fuse_attention_for_ort
    from iap_rt.fileio import write_text_atomic
    from iap_rt.modeldir import ORT_UNET_FILE, network_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", type=int, default=64, help="latent side (64 = 512x512 SD)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ort_cpu_mha_sd15.json")
    a = ap.parse_args(argv)
    model = a.model or cache_root(None, "sd15") / "model-fp32"
    src, dst = model / network_file("unet"), model / ORT_UNET_FILE
    if not src.is_file():
        print(f"{src} is missing: run `iap-rt bench --arch sd15` once, or pass --model DIR")
        return 1
    t0 = time.perf_counter()
    fused = fuse_attention_for_ort(src, dst)
    rewrite_s = time.perf_counter() - t0
    runs: dict[str, list[dict]] = {"as_exported": [], "fused_mha": []}
    try:
        for _ in range(a.rounds):
            for name, path in (("as_exported", src), ("fused_mha", dst)):
                cmd = [sys.executable, "-c", WORKER, str(path), str(a.steps), str(a.threads),
                       str(a.side)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
                print(name, runs[name][-1], flush=True)
    finally:
        dst.unlink(missing_ok=True)

    def summary(rs: list[dict]) -> dict:
        steps = sorted(t for r in rs for t in r["steps_s"])
        return {
            "unet_step_median_s": steps[len(steps) // 2],
            "unet_step_spread_s": [steps[0], steps[-1]],
            "first_call_s": [r["first_s"] for r in rs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "runs": rs,
        }

    res = {k: summary(v) for k, v in runs.items()}
    doc = {
        "machine": machine_info(),
        "config": {
            "model": str(model),
            "batch": 2,
            "latent_side": a.side,
            "steps": a.steps,
            "rounds": a.rounds,
            "threads": a.threads,
        },  # fmt: skip
        "attentions_fused": fused,
        "rewrite_s": rewrite_s,
        "results": res,
        "speedup": res["as_exported"]["unet_step_median_s"]
        / res["fused_mha"]["unet_step_median_s"],
        "peak_rss_saved_mb": res["as_exported"]["peak_rss_mb"] - res["fused_mha"]["peak_rss_mb"],
        "command": "python bench/ort_cpu_mha.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_text_atomic(a.out, json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("attentions_fused", "speedup", "peak_rss_saved_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
