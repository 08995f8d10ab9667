"""The measuring half of ``bench/gpu_check.sh`` (the device check of the GPU path; its header
and bench/README.md, "GPU check", say what to run; ``bench/gpu_carry.py`` is how the software
gets there). Each subcommand is one step of the script, run on the device machine:

    export CACHE ARCH PRECISION STATUS     the bench model (build + ``iap-rt export``) into the
                                           bench's cache, every child's output in full
    toy OUT DEVICE                         stage 1: ORT on DEVICE vs the CPU provider on the
                                           embedded toy model (fp32), cold start
    evidence OUT CACHE ARCH KEEP DEVICE    stage 3: one UNet call torch vs ORT, ORT's profile
                                           of the fused attention, kept outputs vs torch's
    done STAGE_JSON                        exit 0 when a stage's result is final
    summary RESULTS                        the numbers that matter, a few lines per stage

``export`` and ``evidence`` reach torch (through children, or their own imports).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


# ---- there: the bench model -------------------------------------------------------------------
def export(cache: Path, arch: str, precision: str, status: Path) -> int:
    """Build the bench's ``arch`` sources and export them into the bench's cache layout, as
    ``iap-rt bench`` would, but with each child's whole output on this process's stdout/stderr
    (the bench keeps only a last line). ``status``: JSON written as each step ends."""
    from iap_rt.bench.config import BenchConfig
    from iap_rt.bench.protocol import child_env
    from iap_rt.bench.sources import Sources, cache_root, export_args, model_ok, prepare_sources

    cfg = BenchConfig(arch=arch, fp16=precision == "fp16", cache_dir=str(cache))
    root = cache_root(cache, arch)
    sources = Sources(root / f"model-{precision}", root / "sd", root / "encoder")
    import iap_rt

    doc: dict = {"status": "running", "steps": {}, "started": time.time(),
                 "iap_rt": os.path.dirname(os.path.abspath(iap_rt.__file__))}  # fmt: skip
    steps = [("build", [sys.executable, "-m", "iap_rt.train.bench_torch", "build", arch,
                        str(root)], root.parent)]  # fmt: skip
    if not model_ok(sources.model_dir):
        steps.append(("export", [sys.executable, "-m", "iap_rt.cli", *export_args(cfg, sources)],
                      root))  # fmt: skip
    for name, cmd, cwd in steps:
        cwd.mkdir(parents=True, exist_ok=True)
        print(f"[export] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        code = subprocess.call(cmd, cwd=cwd, env=child_env(None))
        doc["steps"][name] = {"seconds": round(time.time() - t0, 1), "exit_code": code}
        if code != 0:
            doc["status"] = "failed"
            status.write_text(json.dumps(doc, indent=1))
            print(f"[export] {name} FAILED with exit code {code} (its output is above)", flush=True)
            return 1
        status.write_text(json.dumps(doc, indent=1))
    # the cache as the bench lays it out: prepare_sources finds it complete, builds nothing
    hit = prepare_sources(cfg, log=print)
    if hit.build_s is not None or Path(hit.model_dir) != sources.model_dir:
        doc["status"] = "failed"
        doc["error"] = "the exported cache is not where iap-rt bench looks for it"
    else:
        doc["status"] = "done"
    doc["seconds"] = round(time.time() - doc["started"], 1)
    status.write_text(json.dumps(doc, indent=1))
    print(f"[export] {doc['status']} in {doc['seconds']} s", flush=True)
    return 0 if doc["status"] == "done" else 1


# ---- there: stage documents -------------------------------------------------------------------
def write_doc(path: Path, doc: dict) -> None:
    """``doc`` (+ where this process imported iap_rt from) to ``path``; its gist to stdout."""
    import iap_rt
    from iap_rt.fileio import write_json_atomic

    doc["iap_rt"] = os.path.dirname(os.path.abspath(iap_rt.__file__))
    write_json_atomic(path, doc)
    print(json.dumps({k: v for k, v in doc.items() if k != "machine"}, indent=1)[:4000])


def compare(a, b, rtol: float, atol: float = 0.0) -> dict:
    """max |a - b| against the tolerance ``atol + rtol * max |a|`` (a: the reference)."""
    import numpy as np

    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = float(np.abs(a64).max())
    diff = float(np.abs(a64 - b64).max())
    tol = atol + rtol * ref
    return {"max_abs_diff": diff, "reference_absmax": ref, "tolerance": tol, "ok": diff <= tol}


# tolerances stated once (bench/README.md, "GPU check" repeats them)
# fp32 on the CUDA provider vs the CPU provider, whole loop: the CUDA provider may run fp32
# matmuls and convolutions in TF32 (its use_tf32 option), ~1e-3 per op
TOL_TOY_LATENTS_RTOL = 1e-2
TOL_E2E_LATENTS_RTOL = 5e-2  # fp16 final latents vs torch fp16: 5x one fp16 call's rtol
TOL_PIXELS_MEAN = 2.0  # fp16 images vs torch fp16: mean |diff| in uint8 levels
TOY_PROMPT = "左边有一个红色的圆"


def toy(out: Path, device: str) -> int:
    """Stage 1: does ONNX Runtime's ``device`` provider start; its cold start on the embedded
    toy model (fp32); its final latents and images against the CPU provider's."""
    import numpy as np

    t0 = time.perf_counter()
    import onnxruntime  # noqa: F401

    from iap_rt.backends.ort import OrtBackend
    from iap_rt.bench.machine import machine_info
    from iap_rt.bench.stats import pixel_diff
    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.ortinfo import ort_status
    from iap_rt.pipeline import Pipeline

    doc: dict = {"stage": "toy", "device": device, "import_s": time.perf_counter() - t0,
                 "errors": [], "machine": machine_info()}  # fmt: skip
    status = ort_status(try_cuda=device == "cuda")
    doc.update(onnxruntime=status.flavour, providers=list(status.providers),
               cuda_problem=status.cuda_problem, cuda_fix=status.cuda_fix)  # fmt: skip
    model = ModelDir.open(default_model_dir())
    doc["model"] = {"id": model.model_id, "precision": {n: model.precision(n) for n in
                                                         model.manifest["networks"]}}  # fmt: skip
    results = {}
    try:
        for dev in dict.fromkeys((device, "cpu")):
            t1 = time.perf_counter()
            pipe = Pipeline(model, OrtBackend(dev), progress=False)
            pipe.runners  # noqa: B018 - sessions now, inside the cold start
            load_s = time.perf_counter() - t1
            first = pipe(TOY_PROMPT, seed=0)
            cold = time.perf_counter() - t1
            e2e = []
            for _ in range(3):
                pipe.clear_cache()
                t2 = time.perf_counter()
                res = pipe(TOY_PROMPT, seed=0)
                e2e.append(time.perf_counter() - t2)
            results[dev] = res
            doc[dev] = {"load_s": load_s, "cold_start_s": cold, "first_image_s":
                        first.timings.total_s, "e2e_s": sorted(e2e)[1], "e2e_runs": e2e,
                        "steps": len(res.timings.unet_s)}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the answer of this stage
        doc["errors"].append(f"{type(e).__name__}: {e}")
    if device in results and "cpu" in results:
        a, b = results["cpu"], results[device]
        doc["latents_vs_cpu"] = compare(a.latents, b.latents, TOL_TOY_LATENTS_RTOL)
        doc["pixels_vs_cpu"] = pixel_diff(a.images, b.images)
        doc["latents_vs_cpu"]["finite"] = bool(np.isfinite(b.latents).all())
    doc["complete"] = True
    write_doc(out, doc)
    return 0 if not doc["errors"] else 1


def evidence(out: Path, cache: Path, arch: str, keep: Path, device: str) -> int:
    """Stage 3: (a) one UNet call with identical inputs: torch fp32 (the export's reference;
    TF32 off), torch fp16 (SDPA) where CUDA runs, and ONNX Runtime on ``device`` with each UNet
    graph the ort backends run, against the export's own tolerance; (b) ONNX Runtime's profile of
    that call: which provider ran each node, the fused MultiHeadAttention ones named; (c) every
    backend's kept final latents and images vs torch's."""
    import numpy as np

    from iap_rt.bench.machine import machine_info
    from iap_rt.bench.sources import cache_root
    from iap_rt.bench.stats import pixel_diff
    from iap_rt.modeldir import ModelDir
    from iap_rt.specs import NETWORKS

    doc: dict = {"stage": "evidence", "device": device, "errors": [], "machine": machine_info()}
    root = cache_root(cache, arch)
    try:
        model = next(p for p in sorted(root.glob("model-*")) if (p / "manifest.json").is_file())
        md = ModelDir.open(model)
        side = {"sd15": 64}.get(arch, 8)  # latent side: 512 px for sd15
        prec = md.precision("unet")
        feeds = NETWORKS["unet"].dummy_inputs(md.dims, prec, {"N": 2, "h": side, "w": side})
        doc["unet_call"] = unet_call(md, root / "sd" / "unet", feeds, device, out.parent)
    except Exception as e:  # noqa: BLE001 - the answer of this part
        doc["errors"].append(f"unet call: {type(e).__name__}: {str(e)[:2000]}")
    # (c) final latents and images of every bench stage, vs torch's (same seed and noise)
    outputs = {}
    for f in sorted(keep.glob("*.latents.npy")):
        backend = f.name[: -len(".latents.npy")]
        img = keep / f"{backend}.images.npy"
        outputs[backend] = (np.load(f), np.load(img) if img.is_file() else None)
    doc["outputs_vs_torch"] = {}
    if "torch" in outputs:
        lat0, img0 = outputs["torch"]
        for backend, (lat, img) in outputs.items():
            if backend != "torch":
                row = compare(lat0, lat, TOL_E2E_LATENTS_RTOL)
                row["pixels"] = pixel_diff(img0, img)
                row["pixels_ok"] = bool(row["pixels"] and row["pixels"]["mean"] <= TOL_PIXELS_MEAN)
                doc["outputs_vs_torch"][backend] = row
    doc["tolerances"] = {
        "unet_call": "the export's own: max|diff| <= atol + rtol * max|reference| (fp16 vs torch "
        "fp32: 5e-3 + 1e-2 x; fp32: 1e-4 + 1e-4 x); ORT fp16 vs torch fp16: twice the fp16 rule",
        "latents_rtol": TOL_E2E_LATENTS_RTOL,
        "pixels_mean_levels": TOL_PIXELS_MEAN,
    }
    doc["complete"] = True
    write_doc(out, doc)
    return 0 if not doc["errors"] else 1


def unet_call(md, unet_dir: Path, feeds: dict, device: str, profile_dir: Path) -> dict:
    """(a) and (b) of :func:`evidence` for one set of UNet inputs."""
    from iap_rt.export.networks import EXPORT_CONFIGS

    rule, prec = EXPORT_CONFIGS["unet"], md.precision("unet")
    refs = torch_unet_calls(unet_dir, feeds, device, fp16=prec == "fp16" and device == "cuda")
    doc: dict = {"inputs": {k: list(v.shape) for k, v in feeds.items()}, "precision": prec,
                 "torch": refs.pop("what")}  # fmt: skip
    if "fp16" in refs:
        doc["torch_fp16_vs_torch_fp32"] = compare(refs["fp32"], refs["fp16"], rule.rtol["fp16"],
                                                  rule.atol["fp16"])  # fmt: skip
    # the graph the ort backends run: the fused one where the export wrote it (UNets with
    # external weights), else the exported one (one ORT session of SD 1.5 costs ~20 s there)
    fused = str(md.network_path("unet", "ort")).endswith(".ort.onnx")
    for graph in ("fused",) if fused else ("exported",):
        path = md.network_path("unet", "ort" if graph == "fused" else None)
        got, profile = ort_unet_call(path, feeds, device, profile_dir)
        row = {"graph": os.path.basename(path),
               "vs_torch_fp32": compare(refs["fp32"], got, rule.rtol[prec], rule.atol[prec])}  # fmt: skip
        if "fp16" in refs:
            row["vs_torch_fp16"] = compare(
                refs["fp16"], got, 2 * rule.rtol[prec], 2 * rule.atol[prec]
            )
        doc[graph] = {**row, "profile": profile}
    return doc


def torch_unet_calls(unet_dir: Path, feeds: dict, device: str, fp16: bool) -> dict:
    """The diffusers UNet (the export's source) on ``feeds``: fp32 with TF32 off (the export's
    reference) and, with ``fp16``, fp16 with SDPA (what the torch backend runs)."""
    import torch
    from diffusers import UNet2DConditionModel

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {
        "what": f"diffusers UNet on {dev.type}: fp32 (TF32 off)" + (", fp16 (SDPA)" if fp16 else "")
    }
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16))[: 2 if fp16 else 1]:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype).to(dev).eval()
        x, t, c = (torch.from_numpy(feeds[k]).to(dev) for k in ("sample", "timestep",
                                                                  "encoder_hidden_states"))  # fmt: skip
        with torch.inference_mode():
            y = unet(x.to(dtype), t, c.to(dtype), return_dict=False)[0]
        out[name] = y.float().cpu().numpy()
        del unet
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def ort_unet_call(path, feeds: dict, device: str, profile_dir: Path):
    """ONNX Runtime's UNet on ``feeds`` under its profiler (a warm-up call, then the call whose
    output counts) -> (noise_pred, the nodes that ran per op type and provider, the
    MultiHeadAttention ones counted)."""
    import onnxruntime as ort

    from iap_rt.ortinfo import preload_cuda_libraries

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        preload_cuda_libraries()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(profile_dir / f"ort_profile_{Path(path).stem}")
    sess = ort.InferenceSession(str(path), so, providers=providers)
    sess.run(None, feeds)  # warm-up: cuDNN's algorithm search
    y = sess.run(None, feeds)[0]
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    nodes: dict[str, dict[str, set]] = {}  # op -> provider -> node names
    for ev in events:
        args, name = ev.get("args", {}), ev.get("name", "")
        if ev.get("cat") == "Node" and "op_name" in args and name.endswith("_kernel_time"):
            per = nodes.setdefault(args["op_name"], {})
            per.setdefault(args.get("provider", "?"), set()).add(name[: -len("_kernel_time")])
    mha = nodes.get("MultiHeadAttention", {})
    profile = {
        "session_providers": sess.get_providers(),
        "nodes_by_op_and_provider": {
            op: {p: len(n) for p, n in per.items()} for op, per in sorted(nodes.items())
        },  # fmt: skip
        "mha_nodes_on_cuda": len(mha.get("CUDAExecutionProvider", ())),
        "mha_nodes_elsewhere": sum(len(v) for p, v in mha.items() if p != "CUDAExecutionProvider"),
        "nodes_on_cpu": sum(
            len(n) for per in nodes.values() for p, n in per.items() if p == "CPUExecutionProvider"
        ),  # fmt: skip
    }
    return y.astype("float32"), profile


# ---- there: the retry rule and the summary ------------------------------------------------------
def stage_done(path: Path) -> tuple[bool, str]:
    """(whether a stage's result is final, why not): a stage is final when its document is
    complete and nothing in it failed: no backend errored, timed out or missed the deadline
    (a backend that cannot run here, e.g. CUDA graphs on a CPU, is a final answer)."""
    if not path.is_file():
        return False, "no result yet"
    doc = json.loads(path.read_text())
    if not doc.get("complete"):
        return False, "incomplete (killed mid-stage)"
    if doc.get("errors"):
        return False, "; ".join(doc["errors"])[:300]
    bad = [s for s in doc.get("skipped", []) if s.get("error") or s.get("deadline")]
    if bad:
        return False, "; ".join(f"{s['backend']}: {s['reason']}" for s in bad)[:300]
    return True, "final"


def summary(results: Path) -> None:
    """One line per number that matters (the reply's output tail shows them)."""
    for f in sorted(results.glob("gpu_*.json")):
        doc = json.loads(f.read_text())
        done, why = stage_done(f)
        print(f"== {f.name}: {'final' if done else 'NOT FINAL: ' + why}")
        gpu = (doc.get("machine") or {}).get("gpu")
        if gpu:
            print(f"   gpu {gpu}")
        for r in doc.get("results", []):
            steps = ", ".join(f"{n} steps e2e {v['e2e_s']:.3f} s step {v['unet_step_s'] * 1e3:.1f} ms"
                              f" [{v['unet_step_spread'][0] * 1e3:.1f}, {v['unet_step_spread'][1] * 1e3:.1f}]"
                              for n, v in r.get("by_steps", {}).items())  # fmt: skip
            print(f"   {r['backend']}: {steps}; cold {r['cold_start_s']:.1f} s; gpu "
                  f"{r.get('peak_gpu_mb')} MiB; latents diff {r.get('latents_max_abs_diff_vs_torch')}; "
                  f"pixels mean diff {r.get('pixels_mean_abs_diff_vs_torch')}")  # fmt: skip
        for s in doc.get("skipped", []):
            print(f"   {s['backend']} skipped: {s['reason'][:200]}")
        for key in ("latents_vs_cpu", "unet_call", "outputs_vs_torch", "errors"):
            if doc.get(key):
                print(f"   {key}: {json.dumps(doc[key], default=str)[:600]}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, args in (("export", ("cache", "arch", "precision", "status")), ("toy", ("out", "device")),
                       ("evidence", ("out", "cache", "arch", "keep", "device")), ("done", ("stage",)),
                       ("summary", ("results",))):  # fmt: skip
        p = sub.add_parser(name)
        for arg in args:
            p.add_argument(arg, type=str if arg in ("arch", "precision", "device") else Path)
    a = ap.parse_args(argv)
    if a.cmd == "export":
        return export(a.cache, a.arch, a.precision, a.status)
    if a.cmd == "toy":
        return toy(a.out, a.device)
    if a.cmd == "evidence":
        return evidence(a.out, a.cache, a.arch, a.keep, a.device)
    if a.cmd == "done":
        done, why = stage_done(a.stage)
        print(why)
        return 0 if done else 1
    summary(a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
