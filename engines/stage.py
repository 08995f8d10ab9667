"""Build, reuse and check a model directory's TensorRT engines.

``build_engines``: for each network, the engine ``engines/<gpu-tag>/<net>.<profile>.plan``
and its sidecar ``<net>.<profile>.json`` (written last, so a sidecar means a complete
engine). An engine is reused when its sidecar records the same ONNX sha256, profile,
precision, build options, TensorRT flavour/version and GPU target, and the file still has
the recorded size and sha256. ``maybe_build_engines`` is what ``iap-rt export --engines``
calls; ``check_engines`` is ``iap-rt engines check``.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

from iap_rt import cuda
from iap_rt import enginedir as ed
from iap_rt.config import load_config
from iap_rt.engines.build import BuildOptions, build_engine
from iap_rt.engines.config import EngineConfig
from iap_rt.errors import (
    ArtifactError,
    BackendUnavailableError,
    ConfigError,
)
from iap_rt.fileio import ensure_dir, sha256_file, write_bytes_atomic, write_json_atomic
from iap_rt.modeldir import ModelDir

log = logging.getLogger("iap_rt.engines")
MODES = ("none", "auto", "only")
TIMING_CACHE = "timing.cache"
# sidecar fields that must match for an existing engine to be reused
REUSE_KEYS = (
    "format_version", "network", "spec_hash", "precision", "onnx_sha256", "onnx_data_sha256",
    "flavour",
    "trt_version", "target", "profile", "build_options",
)  # fmt: skip


def pick_flavour(requested: str, gpu: cuda.GpuInfo | None) -> str:
    """auto: the one installed; with both, ``tensorrt`` where a GPU is visible (engines tuned
    for it), else ``tensorrt_rtx`` (builds without a GPU)."""
    if requested != "auto":
        return requested
    have = ed.installed_flavours()
    if not have:
        raise BackendUnavailableError(
            "no TensorRT is installed (neither tensorrt nor tensorrt_rtx imports)",
            fix="pip install tensorrt-rtx-cu13 (RTX GPUs, builds without a GPU) or tensorrt "
            "(any NVIDIA GPU); see the README, 'TensorRT engines'.",
        )
    if len(have) == 2:
        return "tensorrt" if gpu is not None else "tensorrt_rtx"
    return have[0]


def _targets(cfg: EngineConfig, flavour: str, gpu: cuda.GpuInfo | None) -> tuple[str, ...]:
    targets = cfg.rtx_targets()
    if flavour == "tensorrt":
        if targets:
            raise ConfigError(
                "--compute-capability applies to TensorRT-RTX only; full TensorRT builds for "
                "the GPU it runs on",
                fix="drop --compute-capability, or pass --trt-flavour tensorrt_rtx.",
            )
        return ()
    if targets == ("current",):
        if gpu is None:
            raise ConfigError(
                "--compute-capability current needs a visible GPU",
                fix="name the targets, e.g. --compute-capability 8.6,8.9, or leave it empty.",
            )
        return (gpu.cc_str,)
    return targets


def _target_record(flavour: str, gpu: cuda.GpuInfo | None, targets: tuple[str, ...]) -> dict:
    if flavour == "tensorrt":
        assert gpu is not None  # gpu_tag raised before
        return {"gpu_tag": ed.gpu_tag(flavour, gpu), "compute_capabilities": [gpu.cc_str],
                "gpu_name": gpu.name}  # fmt: skip
    return {"gpu_tag": ed.gpu_tag(flavour, gpu, targets), "compute_capabilities": list(targets),
            "gpu_name": None}  # fmt: skip


def _reusable(sidecar_path: Path, want: dict) -> dict | None:
    """The existing sidecar if its engine can be reused for ``want``, else None."""
    try:
        have = ed.read_sidecar(sidecar_path)
    except ArtifactError:
        return None
    if any(have.get(k) != want.get(k) for k in REUSE_KEYS):
        return None
    if ed.engine_file_problem(ed.engine_path(sidecar_path, have), have) is not None:
        return None
    return have


def build_engines(
    model_dir: str | os.PathLike,
    config: EngineConfig | None = None,
    *,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Build (or reuse) the engines ``config`` asks for; return the engine paths."""
    config = config or EngineConfig()
    model = ModelDir.open(model_dir)
    cfg = config.checked(model.dims, int(model.manifest.get("image_size", 512)))
    gpu = cuda.gpu_info()
    flavour = pick_flavour(cfg.flavour, gpu)
    trt = ed.import_trt(flavour)
    version = ed.trt_version(trt)
    targets = _targets(cfg, flavour, gpu)
    target = _target_record(flavour, gpu, targets)
    out_dir = ensure_dir(model.engines_dir / target["gpu_tag"])
    options = BuildOptions(
        optimization_level=cfg.optimization_level,
        workspace_mb=cfg.workspace_mb,
        detailed_profile=cfg.detailed_profile,
        compute_capabilities=targets,
    )
    cache_path = out_dir / TIMING_CACHE
    use_cache = cfg.timing_cache and flavour == "tensorrt"  # TensorRT-RTX: a no-op
    cache = cache_path.read_bytes() if use_cache and cache_path.is_file() else None
    label = "TensorRT-RTX" if flavour == "tensorrt_rtx" else "TensorRT"
    paths = []
    for net in cfg.network_names(model.networks):
        spec = model.spec(net)
        profile = cfg.profile(spec, model.dims)
        stem = ed.engine_stem(net, profile.pop("label"))
        plan_path = out_dir / f"{stem}{ed.ENGINE_SUFFIX}"
        side_path = out_dir / f"{stem}{ed.SIDECAR_SUFFIX}"
        onnx_path = model.network_path(net)
        precision = model.precision(net)
        want = {
            "format": ed.SIDECAR_FORMAT,
            "format_version": ed.SIDECAR_VERSION,
            "network": net,
            "engine_file": plan_path.name,
            "spec_hash": model.spec_hash,
            "precision": precision,
            "onnx_file": onnx_path.name,
            "onnx_sha256": sha256_file(onnx_path),
            "onnx_data_sha256": _external_data_sha256(model, net),
            "flavour": flavour,
            "trt_version": version,
            "target": target,
            "profile": profile,
            "build_options": options.record(),
        }
        rel = plan_path.relative_to(model.path)
        hints = {"rebuild_args": cfg.rebuild_args(), "runtime": {"cuda_graph": cfg.cuda_graph}}
        have = None if force else _reusable(side_path, want)
        if have is not None:
            if any(have.get(k) != v for k, v in hints.items()):  # runtime hints only
                write_json_atomic(side_path, {**have, **hints})
            echo(f"{net}: up to date, reusing {rel}")
            paths.append(plan_path)
            _remove_other_profiles(out_dir, net, stem, echo)
            continue
        echo(f"{net}: building {rel} ({precision}, {label} {version}) ...")
        side_path.unlink(missing_ok=True)  # no sidecar may describe a plan being replaced
        built = build_engine(
            trt, onnx_path, spec, precision, model.dims, profile, options, cache, use_cache
        )
        write_bytes_atomic(plan_path, built.plan)
        digest = hashlib.sha256(memoryview(built.plan)).hexdigest()
        sidecar = {
            **want,
            "engine_bytes": plan_path.stat().st_size,
            "engine_sha256": digest,
            "io": built.io,
            "build_s": round(built.seconds, 2),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "built_on": {"host_gpu": gpu.name if gpu else None, "platform": platform.platform()},
            **hints,
            "iap_rt_version": _iap_rt_version(),
        }
        if built.layers is not None:  # --detailed-profile: what TensorRT fused
            sidecar["layers"] = {
                k: v for k, v in built.layers.items() if k != "fused_attention_names"
            }
        del built.plan
        write_json_atomic(side_path, sidecar)
        if built.timing_cache:
            cache = built.timing_cache
            write_bytes_atomic(cache_path, cache)
        echo(
            f"{net}: wrote {rel} ({sidecar['engine_bytes'] / 2**20:.1f} MiB, {built.seconds:.1f} s)"
        )
        paths.append(plan_path)
        _remove_other_profiles(out_dir, net, stem, echo)
    return paths


def _external_data_sha256(model: ModelDir, net: str) -> str | None:
    """sha256 of the ONNX's external-data file (``unet.onnx.data`` past 2 GB), None without.
    The ``.onnx`` file alone keeps the same bytes when only those weights change."""
    info = model.manifest["networks"][net]
    onnx_path = model.network_path(net)
    data = model.path / info["external_data"] if info.get("external_data") else None
    if data is None and onnx_path.with_name(onnx_path.name + ".data").is_file():
        data = onnx_path.with_name(onnx_path.name + ".data")
    return sha256_file(data) if data is not None else None


def _remove_other_profiles(out_dir: Path, net: str, keep: str, echo) -> None:
    """One engine per network and GPU tag: drop engines of the same network built for
    another profile (the runtime would otherwise load both)."""
    for side in ed.sidecars(out_dir, net):
        stem = side.name[: -len(ed.SIDECAR_SUFFIX)]
        if stem == keep:
            continue
        plan = out_dir / f"{stem}{ed.ENGINE_SUFFIX}"
        side.unlink(missing_ok=True)  # sidecar first: a lone plan is never loaded
        plan.unlink(missing_ok=True)
        echo(f"{net}: removed {plan.name} (another profile)")


def maybe_build_engines(
    model_dir: Path,
    mode: str,
    echo: Callable[[str], None] = print,
    config: EngineConfig | None = None,
) -> list[Path]:
    """What ``iap-rt export --engines MODE`` runs after writing ONNX.

    ``none``: nothing. ``auto``: build when a TensorRT that can build here is installed
    (TensorRT-RTX anywhere, full TensorRT with a GPU), else say why not and return [].
    ``only``: build, and fail if no TensorRT can. ``config`` None = the workspace's
    ``[engines]`` table (``iap-rt.toml``) over the defaults.
    """
    if mode not in MODES:
        raise ConfigError(f"--engines {mode!r} is unknown", fix=f"use one of {', '.join(MODES)}.")
    if mode == "none":
        return []
    if config is None:
        config = load_config(EngineConfig, "engines")
    if mode == "auto":
        reason = _cannot_build_reason(config.flavour)
        if reason:
            echo(
                f"engines: skipped ({reason}); build later with: iap-rt engines build --model {model_dir}"
            )
            return []
    return build_engines(model_dir, config, echo=echo)


def _cannot_build_reason(flavour: str) -> str | None:
    have = ed.installed_flavours()
    wanted = have if flavour == "auto" else [f for f in have if f == flavour]
    if not wanted:
        return (
            f"TensorRT flavour {flavour} is not installed"
            if flavour != "auto"
            else ("no TensorRT is installed: pip install tensorrt-rtx-cu13 or tensorrt")
        )
    if wanted == ["tensorrt"] and cuda.gpu_info() is None:
        return "full TensorRT needs a GPU to build and none is visible"
    return None


def check_engines(model_dir, flavour: str = "auto") -> list[dict]:
    """Check every engine under ``model_dir/engines``: one row per engine with ``status``
    ``ok`` or the problems (sidecar vs model, installed TensorRT and GPU where present,
    file size and sha256). Nothing is deserialized."""
    model = ModelDir.open(model_dir)
    gpu = cuda.gpu_info()
    installed = {f: None for f in ed.installed_flavours()}
    rows = []
    for d in sorted(p for p in model.engines_dir.glob("*") if p.is_dir()):
        for side in ed.sidecars(d):
            row = {"dir": d.name, "sidecar": side.name, "problems": []}
            try:
                sc = ed.read_sidecar(side, model.path)
            except ArtifactError as e:
                row["problems"].append(str(e))
                rows.append(row)
                continue
            f = sc.get("flavour")
            if flavour != "auto" and f != flavour:
                continue
            version = None
            if f in installed:
                installed[f] = installed[f] or ed.trt_version(ed.import_trt(f))
                version = installed[f]
            else:
                row["problems"].append(f"flavour: {f} is not installed here")
            row["problems"] += ed.sidecar_problems(
                sc, model, flavour=f if f in installed else None, version=version, gpu=gpu
            )
            problem = ed.engine_file_problem(ed.engine_path(side, sc), sc)
            if problem:
                row["problems"].append(problem)
            row.update(
                engine=sc.get("engine_file"), network=sc.get("network"), flavour=f,
                trt_version=sc.get("trt_version"), precision=sc.get("precision"),
                rebuild=ed.rebuild_command(model.path, sc),
            )  # fmt: skip
            rows.append(row)
    return rows


def _iap_rt_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("iap-rt")
    except md.PackageNotFoundError:
        return None
