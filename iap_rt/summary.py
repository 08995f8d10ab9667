"""What ``iap-rt info`` says: the install (iap-rt, ONNX Runtime, TensorRT) and one model
directory, as one screen of text (:func:`summary_lines`) or as everything, for scripts
(:func:`report`: the manifest whole, integrity, engines, leftovers)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from iap_rt.errors import ArtifactMismatchError
from iap_rt.fileio import leftovers, lock_holder
from iap_rt.modeldir import ModelDir
from iap_rt.requests import model_defaults
from iap_rt.specs import NETWORKS

TRT_DISTS = (
    ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
    ("tensorrt_rtx", ("tensorrt-rtx-cu13", "tensorrt-rtx", "tensorrt_rtx")),
)


def tensorrt_flavours() -> dict:
    """The installed TensorRT flavours and their versions (without importing them)."""
    found = {}
    for flavour, dists in TRT_DISTS:
        for d in dists:
            try:
                found[flavour] = importlib.metadata.version(d)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def du(path: Path) -> int:
    """Bytes under ``path`` (files only; vanished entries count 0)."""
    total = 0
    for p in path.rglob("*") if path.exists() else ():
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def report(path: Path) -> dict:
    """Everything ``iap-rt info --json`` prints: versions, ONNX Runtime, TensorRT, and the
    model (its manifest whole, integrity, engines, leftovers)."""
    from iap_rt.ortinfo import ort_status

    ort = ort_status()
    model = ModelDir.open(path, verify=False, clean=False)
    holder = lock_holder(path)
    try:
        hashed = model.verify()
        integrity = {"ok": True, "files": len(model.recorded_hashes()), "hashed_now": len(hashed)}
    except ArtifactMismatchError as e:
        integrity = {"ok": False, "problem": str(e)}
    engines = sorted(
        str(p.relative_to(model.engines_dir)) for p in model.engines_dir.glob("*/*.plan")
    )
    return {
        "iap_rt": importlib.metadata.version("iap-rt"),
        "python": sys.version.split()[0],
        "onnxruntime": {
            "wheels": ort.dists,
            "version": ort.version,
            "providers": list(ort.providers),
            "cuda_problem": ort.cuda_problem,
            "cuda_fix": ort.cuda_fix,
            "lines": ort.lines(),
        },  # fmt: skip
        "tensorrt": tensorrt_flavours(),
        "model": {
            "path": str(model.path),
            "defaults": model_defaults(model),
            "integrity": integrity,
            "engines": engines,
            "leftovers": [
                {"path": str(p), "bytes": du(p), "in_use_by_pid": holder} for p in leftovers(path)
            ],
            "manifest": model.manifest,
        },
    }


def summary_lines(doc: dict) -> list[str]:
    """:func:`report` as about 20 lines a person reads."""
    m, info = doc["model"]["manifest"], doc["model"]
    trt = doc["tensorrt"]
    out = [f"iap-rt {doc['iap_rt']}  python {doc['python']}", *doc["onnxruntime"]["lines"]]
    out.append("TensorRT: " + (", ".join(f"{k} {v}" for k, v in trt.items()) or "not installed"))
    out.append(f"model: {m.get('model_id')}  ({info['path']})")
    dims, d = m.get("dims", {}), info["defaults"]
    unet = m.get("arch", {}).get("unet", {})
    arch = f"UNet channels {'/'.join(map(str, unet['channels']))}, " if unet.get("channels") else ""
    kind = m.get("architecture", "sd")
    kind = f"{kind} (inpainting UNet), " if kind == "sd-inpaint" else ""
    out.append(
        f"  architecture: {kind}{arch}cross-attention {dims.get('cross_attention_dim')}, "
        f"{dims.get('latent_channels')} latent channels, VAE x{dims.get('vae_scale_factor')}, "
        f"text {dims.get('text_max_length')} tokens"
    )
    out.append(f"  native size: {d['width']}x{d['height']} (sides: multiples of "
               f"{d['size_multiple']})")  # fmt: skip
    for key, label in (("base_model", "base"), ("encoder", "Chinese encoder")):
        if m.get(key):
            out.append(f"  {label}: {m[key]}")
    nets = m.get("networks", {})
    parts = [f"{n} {nets[n].get('precision')} {nets[n].get('bytes', 0) / 1e6:.1f} MB"
             for n in NETWORKS if n in nets]  # fmt: skip
    out.append("  networks: " + ", ".join(parts))
    integ = info["integrity"]
    if integ["ok"]:
        how = (
            f"hashed {integ['hashed_now']} now"
            if integ["hashed_now"]
            else "unchanged since verified"
        )
        out.append(f"  integrity: {integ['files']} network file(s) match the manifest ({how})")
    else:
        out.append(f"  integrity: FAILED: {integ['problem']}")
    engines = info["engines"]
    out.append("  engines: " + (", ".join(engines) if engines else "none (iap-rt engines build)"))
    out.append(f"  sampling defaults: {d['scheduler']}, guidance {d['guidance']:g}, "
               f"{d['steps']} steps")  # fmt: skip
    world = m.get("caption_world")
    if isinstance(world, dict) and world.get("draws"):
        ex = world.get("examples") or []
        out.append(f"  knows: {world['draws']}" + (f'; try "{ex[0]}"' if ex else ""))
    for left in info["leftovers"]:
        state = (
            f"in use by a running export, pid {left['in_use_by_pid']}" if left["in_use_by_pid"]
            else "left by a killed export; the next generate, export or engines run removes it"
        )  # fmt: skip
        out.append(f"  leftover: {left['path']} ({left['bytes'] / 1e6:.1f} MB, {state})")
    out.append("  (iap-rt info --json: the whole manifest)")
    return out
