"""The engine-artifact format: ``<model>/engines/<gpu-tag>/``, sidecars, discovery, checks.

Written by the engines stage (``iap-rt engines build``, :mod:`iap_rt.engines`), read by the
TensorRT backend (:mod:`iap_rt.backends.trt`); this module is the one place their rules live::

    engines/<gpu-tag>/unet.N2_h64_w64.plan    the serialized engine; the name says its profile
    engines/<gpu-tag>/unet.N2_h64_w64.json    its sidecar: flavour + version, target GPU,
                                              profile, precision, sha256 of the source ONNX,
                                              size + sha256 of the engine, build options

Which TensorRT is installed (``tensorrt`` >= 10 or ``tensorrt_rtx``; same Python API) is part
of the rules: an engine only runs on the flavour and version that built it. Every sidecar
field is checked against the installed TensorRT, this GPU and the model directory, and the
engine file's size and sha256 against the sidecar, *before* TensorRT sees a byte; a mismatch
is an :class:`ArtifactMismatchError` naming each field that differs and the command that
rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import re
from pathlib import Path

from iap_rt import cuda
from iap_rt.cuda import GpuInfo
from iap_rt.errors import (
    ArtifactError,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    BackendUnavailableError,
    ConfigError,
)
from iap_rt.modeldir import ModelDir
from iap_rt.specs import CORE_NETWORKS, NETWORKS

log = logging.getLogger("iap_rt.enginedir")

FLAVOURS = ("tensorrt", "tensorrt_rtx")  # order = preference where both are usable
SIDECAR_FORMAT = "iap-rt-engine"
SIDECAR_VERSION = 1
ENGINE_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
RTX_PORTABLE = "portable"  # the engine dir of TensorRT-RTX's default targets (no explicit list)
# the GPUs a TensorRT-RTX engine built without explicit targets runs on (its support matrix:
# "portable across devices with compute capabilities 8.6, 8.9, and 12.0"); always cut down to
# what the installed TensorRT-RTX itself lists (:func:`supported_ccs`)
RTX_PORTABLE_CCS = ((8, 6), (8, 9), (12, 0))
RUNTIME_CACHE_SUFFIX = ".cache"  # TensorRT-RTX's JIT runtime cache, per GPU (runtime_cache_path)


# ---- installed TensorRT ---------------------------------------------------------------
def installed_flavours() -> list[str]:
    """TensorRT flavours importable here (found without importing them)."""
    return [f for f in FLAVOURS if importlib.util.find_spec(f) is not None]


def import_trt(flavour: str):
    """Import the ``tensorrt`` or ``tensorrt_rtx`` module, or say how to install it."""
    if flavour not in FLAVOURS:
        raise ConfigError(
            f"unknown TensorRT flavour {flavour!r}", fix=f"use auto, {' or '.join(FLAVOURS)}."
        )
    try:
        return importlib.import_module(flavour)
    except ImportError as e:
        pkg = "tensorrt-rtx-cu13" if flavour == "tensorrt_rtx" else "tensorrt"
        raise BackendUnavailableError(
            f"TensorRT flavour '{flavour}' is not installed ({e})",
            fix=f"pip install {pkg} (see the README, 'TensorRT engines'), or use --backend ort.",
        ) from e


def trt_version(trt) -> str:
    return str(trt.__version__)


def supported_ccs(trt) -> tuple[tuple[int, int], ...] | None:
    """The compute capabilities the installed TensorRT runs engines on, from its own list:
    TensorRT-RTX's ``ComputeCapability`` enum (``SM75`` ... ``SM121``; 1.7 has no SM90, so no
    H100/H200). None where the module lists none (full TensorRT: every GPU it was built for)."""
    enum = getattr(trt, "ComputeCapability", None)
    if enum is None:
        return None
    out = []
    for name in getattr(enum, "__members__", {}):
        m = re.fullmatch(r"SM(\d+)(\d)", name)  # SM75 -> 7.5, SM120 -> 12.0, SM121 -> 12.1
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
    return tuple(sorted(out)) or None


def _cc_list(ccs) -> str:
    return ", ".join(f"{a}.{b}" for a, b in ccs)


def unsupported_gpu_reason(flavour: str, trt, gpu: GpuInfo) -> str | None:
    """Why the installed ``flavour`` cannot run engines on ``gpu`` (None: it can)."""
    ccs = supported_ccs(trt)
    if ccs is None or gpu.cc in ccs:
        return None
    return (
        f"{flavour} {trt_version(trt)} runs engines on compute capabilities {_cc_list(ccs)} "
        f"only; this GPU ({gpu.name}) is {gpu.cc_str}"
    )


def portable_ccs(trt=None) -> tuple[tuple[int, int], ...]:
    """The GPUs a portable TensorRT-RTX engine runs on (those the installed one lists)."""
    ccs = supported_ccs(trt) if trt is not None else None
    return tuple(c for c in RTX_PORTABLE_CCS if ccs is None or c in ccs)


# ---- tags, names, profiles -------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_tag(flavour: str, gpu: GpuInfo | None, targets: tuple[str, ...] = ()) -> str:
    """The ``engines/<gpu-tag>/`` directory name.

    Full TensorRT engines belong to one GPU model (``tensorrt-sm89-nvidia-geforce-rtx-4090``);
    TensorRT-RTX engines to a set of compute capabilities (``tensorrt_rtx-portable`` for its
    default set, ``tensorrt_rtx-sm86-sm89`` for explicit targets).
    """
    if flavour == "tensorrt":
        if gpu is None:
            raise BackendUnavailableError(
                "full TensorRT builds and runs engines only on a machine with an NVIDIA GPU, "
                "and none is visible here",
                fix="run on the GPU machine, or install tensorrt-rtx-cu13 (builds without a GPU) "
                "and pass --trt-flavour tensorrt_rtx.",
            )
        return f"tensorrt-sm{gpu.cc[0]}{gpu.cc[1]}-{_slug(gpu.name)}"
    if not targets:
        return f"tensorrt_rtx-{RTX_PORTABLE}"
    return "tensorrt_rtx-" + "-".join("sm" + t.replace(".", "") for t in targets)


def engine_stem(network: str, label: str) -> str:
    return f"{network}.{label}"


def profile_label(axes: dict[str, list[int]]) -> str:
    """``{"N": [2, 2, 2], "h": [32, 64, 96]}`` -> ``N2_h32-96`` (min-max; opt in the sidecar)."""
    parts = []
    for axis, (lo, _opt, hi) in axes.items():
        parts.append(f"{axis}{lo}" if lo == hi else f"{axis}{lo}-{hi}")
    return "_".join(parts)


def profile_covers(axes: dict[str, list[int]], values: dict[str, int]) -> bool:
    return all(lo <= values.get(a, lo) <= hi for a, (lo, _opt, hi) in axes.items())


def rebuild_command(model_path, sidecar: dict | None = None, flavour: str | None = None) -> str:
    args = (sidecar or {}).get("rebuild_args", "")
    flav = flavour or (sidecar or {}).get("flavour")
    cmd = f"iap-rt engines build --model {model_path}"
    if (sidecar or {}).get("network") in NETWORKS:
        cmd += f" --networks {sidecar['network']}"
    if args:
        cmd += f" {args}"
    if flav:
        cmd += f" --trt-flavour {flav}"
    return cmd + " --force"


# ---- sidecars -----------------------------------------------------------------------------
def sidecars(engine_dir: Path, network: str | None = None) -> list[Path]:
    """Sidecar files in one ``engines/<gpu-tag>/`` directory (of one network if given)."""
    if not engine_dir.is_dir():
        return []
    prefix = f"{network}." if network else ""
    return sorted(
        p
        for p in engine_dir.glob(f"{prefix}*{SIDECAR_SUFFIX}")
        if p.name.split(".", 1)[0] in NETWORKS
    )


def read_sidecar(path: Path, model_path=None) -> dict:
    fix = f"rebuild: {rebuild_command(model_path or '<model dir>')}"
    try:
        sc = json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"engine sidecar {path} is missing", fix=fix) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"engine sidecar {path} is corrupt (not JSON: {e})", fix=fix) from e
    if not isinstance(sc, dict) or sc.get("format") != SIDECAR_FORMAT:
        raise ArtifactError(f"{path} is not an iap-rt engine sidecar", fix=fix)
    return sc


def engine_path(sidecar_path: Path, sidecar: dict) -> Path:
    return sidecar_path.with_name(Path(str(sidecar.get("engine_file", ""))).name or "?")


def sidecar_problems(
    sc: dict,
    model: ModelDir,
    *,
    flavour: str | None,
    version: str | None,
    gpu: GpuInfo | None,
) -> list[str]:
    """Every sidecar field that disagrees with this machine/model, as ``field: found vs
    expected`` lines. ``flavour``/``version``/``gpu`` None = not checked (not known here)."""
    out = []

    def differ(field, found, expected, why=""):
        if found != expected:
            out.append(f"{field}: {found!r} in the sidecar, expected {expected!r}{why}")

    differ("format_version", sc.get("format_version"), SIDECAR_VERSION)
    net = sc.get("network")
    if net not in NETWORKS:
        out.append(f"network: {net!r} is not one of {list(NETWORKS)}")
        return out
    differ("spec_hash", sc.get("spec_hash"), model.spec_hash, " (this iap-rt's shape contract)")
    info = model.manifest.get("networks", {}).get(net, {})
    differ("precision", sc.get("precision"), info.get("precision"), " (the model's manifest)")
    if info.get("sha256"):
        differ(
            "onnx_sha256",
            sc.get("onnx_sha256"),
            info["sha256"],
            f" (sha256 of {info.get('file')}: the ONNX was re-exported since the build)",
        )
    if info.get("data_sha256"):
        differ(
            "onnx_data_sha256",
            sc.get("onnx_data_sha256"),
            info["data_sha256"],
            f" (sha256 of {info.get('external_data')}: the ONNX weights changed since the build)",
        )
    if flavour is not None:
        differ("flavour", sc.get("flavour"), flavour, " (the TensorRT in use)")
    if version is not None and sc.get("flavour") == flavour:
        differ("trt_version", sc.get("trt_version"), version, " (installed)")
    if gpu is not None:
        targets = list(sc.get("target", {}).get("compute_capabilities", []))
        if sc.get("flavour") == "tensorrt_rtx" and not targets:
            if gpu.cc not in RTX_PORTABLE_CCS:
                out.append(
                    f"compute_capability: engine targets TensorRT-RTX's portable set "
                    f"({_cc_list(RTX_PORTABLE_CCS)}), this GPU ({gpu.name}) is {gpu.cc_str}"
                )
        elif gpu.cc_str not in targets:
            out.append(
                f"compute_capability: {targets} in the sidecar, this GPU ({gpu.name}) is "
                f"{gpu.cc_str}"
            )
    return out


def check_sidecar(sc: dict, path: Path, model: ModelDir, *, flavour, version, gpu) -> None:
    """Raise :class:`ArtifactMismatchError` listing every field that differs."""
    problems = sidecar_problems(sc, model, flavour=flavour, version=version, gpu=gpu)
    if problems:
        raise ArtifactMismatchError(
            f"engine {engine_path(path, sc)} cannot be used here: " + "; ".join(problems),
            fix=f"rebuild it: {rebuild_command(model.path, sc, flavour)}",
        )


def engine_file_problem(path: Path, sc: dict, data: bytes | None = None) -> str | None:
    """Why the engine file does not match its sidecar (missing/size/sha256), or None.

    Pass ``data`` (the bytes about to be deserialized) to hash exactly those bytes."""
    if not path.is_file():
        return f"{path} is missing"
    size = len(data) if data is not None else path.stat().st_size
    if size != sc.get("engine_bytes"):
        return (
            f"{path} has {size} bytes, its sidecar recorded {sc.get('engine_bytes')}: "
            "the file is truncated or was replaced"
        )
    if data is not None:
        digest = hashlib.sha256(data).hexdigest()
    else:
        from iap_rt.fileio import sha256_file

        digest = sha256_file(path)
    if digest != sc.get("engine_sha256"):
        return f"{path} is corrupt: its sha256 differs from the one its sidecar recorded"
    return None


def read_verified_engine(sidecar_path: Path, sc: dict, model: ModelDir) -> bytes:
    """The engine's bytes, after checking size and sha256 against the sidecar."""
    path = engine_path(sidecar_path, sc)
    fix = f"rebuild it: {rebuild_command(model.path, sc)}"
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"{path} is missing (its sidecar {sidecar_path.name} is there)", fix=fix
        )
    if path.stat().st_size != sc.get("engine_bytes"):  # cheap: before reading gigabytes
        raise ArtifactMismatchError(engine_file_problem(path, sc, None) or "", fix=fix)
    data = path.read_bytes()
    problem = engine_file_problem(path, sc, data)
    if problem:
        raise ArtifactMismatchError(problem, fix=fix)
    return data


def find_engine_dir(model: ModelDir, flavour: str, gpu: GpuInfo) -> Path | None:
    """This GPU's ``engines/<gpu-tag>/`` for ``flavour`` (most specific first), or None."""
    root = model.engines_dir
    if not root.is_dir():
        return None
    if flavour == "tensorrt":
        d = root / gpu_tag("tensorrt", gpu)
        return d if sidecars(d) else None
    sm = f"sm{gpu.cc[0]}{gpu.cc[1]}"
    dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.startswith("tensorrt_rtx-")]
    ranked = [d for d in dirs if d.name == f"tensorrt_rtx-{sm}"]
    ranked += [d for d in dirs if sm in d.name.split("-")[1:] and d not in ranked]
    if gpu.cc in RTX_PORTABLE_CCS:
        ranked += [d for d in dirs if d.name == f"tensorrt_rtx-{RTX_PORTABLE}"]
    return next((d for d in ranked if sidecars(d)), None)


def runtime_cache_path(engine_dir: Path, gpu: GpuInfo) -> Path:
    """TensorRT-RTX's JIT runtime cache for ``gpu`` beside its engines: the kernels compiled
    for this GPU, so that the next process loads them instead of compiling again. One per
    compute capability (a portable engine dir serves several GPUs; TensorRT-RTX rejects a
    cache from another GPU, TensorRT-RTX or driver and rebuilds it)."""
    return engine_dir / f"runtime-sm{gpu.cc[0]}{gpu.cc[1]}{RUNTIME_CACHE_SUFFIX}"


def engines_usable(model, device: int = 0) -> bool:
    """True when a GPU is visible, a TensorRT flavour is installed, and this GPU's engine
    directory holds an engine for every network whose sidecar and file size check out."""
    try:
        model = model if isinstance(model, ModelDir) else ModelDir.open(model)
        gpu = cuda.gpu_info(device)
        if gpu is None:
            return False
        for flavour in installed_flavours():
            d = find_engine_dir(model, flavour, gpu)
            if d is None:
                continue
            trt = import_trt(flavour)
            reason = unsupported_gpu_reason(flavour, trt, gpu)
            if reason:  # e.g. TensorRT-RTX on an H100/H200 (SM90): ONNX Runtime instead
                log.info("TensorRT engines not usable: %s", reason)
                continue
            version = trt_version(trt)
            if all(_usable_any(d, n, model, flavour, version, gpu) for n in CORE_NETWORKS):
                return True
    except Exception as e:  # auto-selection must never fail: fall back to ONNX Runtime
        log.info("TensorRT engines not usable: %s", e)
    return False


def _usable_any(d: Path, network: str, model, flavour, version, gpu) -> bool:
    for p in sidecars(d, network):
        try:
            sc = read_sidecar(p)
        except ArtifactError:
            continue
        if sidecar_problems(sc, model, flavour=flavour, version=version, gpu=gpu):
            continue
        f = engine_path(p, sc)
        if f.is_file() and f.stat().st_size == sc.get("engine_bytes"):
            return True
    return False
