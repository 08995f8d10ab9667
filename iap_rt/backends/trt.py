"""TensorRT runtime backend and the engine-artifact rules it enforces.

Imported lazily (``--backend trt`` or ``auto``); the ONNX Runtime path never imports it.
It works with either TensorRT flavour, ``tensorrt`` (>= 10) or ``tensorrt_rtx``: the
Python APIs are the same.

Engines live in ``<model>/engines/<gpu-tag>/`` (written by ``iap-rt engines build``)::

    unet.N2_h64_w64.plan     the serialized engine; the name says its profile
    unet.N2_h64_w64.json     its sidecar: flavour + version, target GPU, profile, precision,
                             sha256 of the source ONNX, size + sha256 of the engine, options

Safe loading: every sidecar field is checked against the installed TensorRT, this GPU and
the model directory, and the engine file's size and sha256 against the sidecar, *before*
TensorRT sees a byte. A mismatch is an :class:`ArtifactMismatchError` naming each field
that differs and the command that rebuilds.

Running: device buffers are allocated once per engine at its profile's largest shapes, one
stream, ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3``, and one
activation buffer shared by all engines (they run one after another on the stream), sized
to the largest. Optional CUDA graph of the UNet step: TensorRT-RTX's built-in capture,
or a captured ``execute_async_v3`` for full TensorRT. CUDA goes through the runtime
library polygraphy locates (``polygraphy.cuda``), never torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iap_rt.backends.base import Backend
from iap_rt.errors import (
    ArtifactError,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    BackendUnavailableError,
    ConfigError,
)
from iap_rt.modeldir import ModelDir
from iap_rt.specs import NETWORKS, spec_hash

log = logging.getLogger("iap_rt.trt")

FLAVOURS = ("tensorrt", "tensorrt_rtx")  # order = preference where both are usable
SIDECAR_FORMAT = "iap-rt-engine"
SIDECAR_VERSION = 1
ENGINE_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
RTX_PORTABLE = "portable"  # TensorRT-RTX's default targets: compute capability 8.0 and newer
RTX_PORTABLE_MIN_CC = (8, 0)


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


# ---- the GPU -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device engines are checked against."""

    index: int
    name: str
    cc: tuple[int, int]  # compute capability (major, minor)

    @property
    def cc_str(self) -> str:
        return f"{self.cc[0]}.{self.cc[1]}"


class _Cudart:
    """The few CUDA runtime calls the backend needs, on the library polygraphy locates."""

    H2D, D2H = 1, 2
    CAPTURE_GLOBAL = 0

    def __init__(self):
        from polygraphy import cuda as pcuda

        self.lib = pcuda.wrapper().handle

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise BackendUnavailableError(
                f"CUDA {what} failed with cudaError {rc}",
                fix="check the NVIDIA driver (nvidia-smi), or use --backend ort.",
            )

    def _ptr_out(self, fn: str, *args) -> int:
        out = ctypes.c_void_p()
        self.check(getattr(self.lib, fn)(ctypes.byref(out), *args), fn)
        return out.value or 0

    def device_count(self) -> int:
        n = ctypes.c_int(0)
        return n.value if self.lib.cudaGetDeviceCount(ctypes.byref(n)) == 0 else 0

    def device(self, index: int) -> GpuInfo:
        attr = ctypes.c_int()
        cc = []
        for code in (75, 76):  # cudaDevAttrComputeCapabilityMajor / Minor
            self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(attr), code, index), "attr")
            cc.append(attr.value)
        props = ctypes.create_string_buffer(8192)  # cudaDeviceProp; `name` is its first field
        fn = (
            getattr(self.lib, "cudaGetDeviceProperties_v2", None)
            or self.lib.cudaGetDeviceProperties
        )
        self.check(fn(props, index), "cudaGetDeviceProperties")
        name = props.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace")
        return GpuInfo(index, name, (cc[0], cc[1]))

    def set_device(self, index: int) -> None:
        self.check(self.lib.cudaSetDevice(index), "cudaSetDevice")

    def malloc(self, nbytes: int) -> int:
        return self._ptr_out("cudaMalloc", ctypes.c_size_t(max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFree(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        return self._ptr_out("cudaStreamCreate")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "synchronize")

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        rc = self.lib.cudaMemcpyAsync(
            ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind,
            ctypes.c_void_p(stream),
        )  # fmt: skip
        self.check(rc, "cudaMemcpyAsync")

    def begin_capture(self, stream: int) -> None:
        rc = self.lib.cudaStreamBeginCapture(ctypes.c_void_p(stream), self.CAPTURE_GLOBAL)
        self.check(rc, "cudaStreamBeginCapture")

    def end_capture(self, stream: int) -> int:
        return self._ptr_out("cudaStreamEndCapture", ctypes.c_void_p(stream))

    def instantiate(self, graph: int) -> int:  # CUDA >= 12 signature
        return self._ptr_out("cudaGraphInstantiate", ctypes.c_void_p(graph), ctypes.c_ulonglong(0))

    def launch(self, graph_exec: int, stream: int) -> None:
        rc = self.lib.cudaGraphLaunch(ctypes.c_void_p(graph_exec), ctypes.c_void_p(stream))
        self.check(rc, "cudaGraphLaunch")

    def destroy_graph(self, graph: int, graph_exec: int) -> None:
        if graph_exec:
            self.lib.cudaGraphExecDestroy(ctypes.c_void_p(graph_exec))
        if graph:
            self.lib.cudaGraphDestroy(ctypes.c_void_p(graph))


@functools.lru_cache(maxsize=8)
def gpu_info(index: int = 0) -> GpuInfo | None:
    """The CUDA device ``index``, or None without a usable GPU/driver/CUDA runtime."""
    try:
        cuda = _Cudart()
        if cuda.device_count() <= index:
            return None
        return cuda.device(index)
    except Exception as e:  # no libcudart, no driver, no device: all mean "no GPU here"
        log.debug("no CUDA GPU: %s", e)
        return None


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
    differ("spec_hash", sc.get("spec_hash"), spec_hash(), " (this iap-rt's shape contract)")
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
            if gpu.cc < RTX_PORTABLE_MIN_CC:
                out.append(
                    f"compute_capability: engine targets TensorRT-RTX's portable set "
                    f"(8.0 and newer), this GPU ({gpu.name}) is {gpu.cc_str}"
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
    if gpu.cc >= RTX_PORTABLE_MIN_CC:
        ranked += [d for d in dirs if d.name == f"tensorrt_rtx-{RTX_PORTABLE}"]
    return next((d for d in ranked if sidecars(d)), None)


def engines_usable(model, device: int = 0) -> bool:
    """True when a GPU is visible, a TensorRT flavour is installed, and this GPU's engine
    directory holds an engine for every network whose sidecar and file size check out."""
    try:
        model = model if isinstance(model, ModelDir) else ModelDir.open(model)
        gpu = gpu_info(device)
        if gpu is None:
            return False
        for flavour in installed_flavours():
            d = find_engine_dir(model, flavour, gpu)
            if d is None:
                continue
            version = trt_version(import_trt(flavour))
            if all(_usable_any(d, n, model, flavour, version, gpu) for n in NETWORKS):
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


# ---- the backend ------------------------------------------------------------------------
def _deserialize(runtime, data: bytes):
    """The one place bytes reach TensorRT (tests replace it to prove checks come first)."""
    return runtime.deserialize_cuda_engine(data)


def _check_validity(trt, runtime, data: bytes, path: Path, sc: dict, model) -> None:
    """TensorRT's own header check (``get_engine_validity``, where this TensorRT has it)."""
    if not hasattr(runtime, "get_engine_validity"):
        return
    try:
        validity, diag = runtime.get_engine_validity(memoryview(data))
    except Exception as e:  # older signature; the sidecar checks already passed
        log.debug("get_engine_validity unavailable: %s", e)
        return
    if validity == trt.EngineValidity.VALID:
        return
    names = [
        n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)
    ]
    if validity == trt.EngineValidity.INVALID:
        raise ArtifactMismatchError(
            f"TensorRT reports engine {path} invalid here: {', '.join(names) or 'no reason given'}",
            fix=f"rebuild it: {rebuild_command(model.path, sc)}",
        )
    log.warning("engine %s is suboptimal on this machine: %s", path, ", ".join(names))


@dataclass
class _Engine:
    path: Path
    sidecar: dict
    engine: object
    context: object = None
    buffers: dict | None = None  # tensor name -> device pointer (sized for the max profile)
    graph: tuple | None = None  # (shape key, cudaGraph_t, cudaGraphExec_t), full TensorRT only
    manual_graph: bool = False

    @property
    def axes(self) -> dict:
        return self.sidecar["profile"]["axes"]


class TensorRTBackend(Backend):
    """Runs a model directory's TensorRT engines (checked first, see the module docstring).

    ``flavour``: auto | tensorrt | tensorrt_rtx. ``cuda_graph``: capture the UNet step in a
    CUDA graph; None = what the engines were built with (``iap-rt engines build
    --cuda-graph``). Options meant for other backends are ignored.
    """

    name = "trt"

    def __init__(self, flavour: str = "auto", cuda_graph: bool | None = None, device: int = 0, **_):
        if flavour != "auto" and flavour not in FLAVOURS:
            raise ConfigError(
                f"unknown TensorRT flavour {flavour!r}", fix=f"use auto, {', '.join(FLAVOURS)}."
            )
        self.flavour, self.cuda_graph, self.index = flavour, cuda_graph, device
        self._gpu: GpuInfo | None = None
        self._trt = None
        self._cuda: _Cudart | None = None
        self._stream = 0
        self._shared = 0  # activation memory shared by all engines
        self._engines: list[_Engine] = []
        self.model_path = None

    @property
    def device(self) -> str:
        if self._gpu is None:
            return f"cuda:{self.index}"
        return f"cuda:{self.index} ({self._gpu.name}, {self.flavour} {trt_version(self._trt)})"

    # ---- loading -------------------------------------------------------------------
    def _pick(self, model: ModelDir, gpu: GpuInfo) -> tuple[str, Path]:
        flavours = installed_flavours() if self.flavour == "auto" else [self.flavour]
        if not flavours:
            import_trt("tensorrt_rtx")  # raises the install hint
        for f in flavours:
            d = find_engine_dir(model, f, gpu)
            if d is not None:
                return f, d
        found = sorted(p.name for p in model.engines_dir.glob("*") if p.is_dir())
        raise ArtifactNotFoundError(
            f"{model.engines_dir} has no engines for this GPU ({gpu.name}, compute capability "
            f"{gpu.cc_str}) and TensorRT {'/'.join(flavours)}; engine directories found: "
            f"{found or 'none'}",
            fix=f"build them: {rebuild_command(model.path, None, flavours[0])}"
            " (or use --backend ort).",
        )

    def load(self, model: ModelDir) -> dict[str, _Runner]:
        gpu = gpu_info(self.index)
        if gpu is None:
            raise BackendUnavailableError(
                f"no CUDA GPU {self.index} is visible (no NVIDIA driver or device)",
                fix="use --backend ort, or run on a machine with an NVIDIA GPU.",
            )
        self.close()
        self.flavour, edir = self._pick(model, gpu)
        trt = self._trt = import_trt(self.flavour)
        self._gpu, self.model_path = gpu, model.path
        version = trt_version(trt)
        self._cuda = cuda = _Cudart()
        cuda.set_device(self.index)  # TensorRT deserializes onto the current device
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        by_net: dict[str, list[_Engine]] = {}
        # 1. check every sidecar and engine file, then deserialize
        for net in NETWORKS:
            paths = sidecars(edir, net)
            if not paths:
                raise ArtifactNotFoundError(
                    f"{edir} has no engine for network '{net}'",
                    fix=f"build it: {rebuild_command(model.path, None, self.flavour)}",
                )
            for p in paths:
                sc = read_sidecar(p, model.path)
                check_sidecar(sc, p, model, flavour=self.flavour, version=version, gpu=gpu)
                data = read_verified_engine(p, sc, model)
                path = engine_path(p, sc)
                _check_validity(trt, runtime, data, path, sc, model)
                engine = _deserialize(runtime, data)
                del data
                if engine is None:
                    raise ArtifactMismatchError(
                        f"TensorRT {version} could not deserialize {path} (see the log above)",
                        fix=f"rebuild it: {rebuild_command(model.path, sc)}",
                    )
                by_net.setdefault(net, []).append(_Engine(path, sc, engine))
        # 2. one stream, contexts without their own activation memory, one shared buffer
        self._stream = cuda.stream()
        graph_default = self.cuda_graph
        if graph_default is None:
            graph_default = bool(by_net["unet"][0].sidecar.get("runtime", {}).get("cuda_graph"))
        need = 0
        for net, engines in by_net.items():
            for e in engines:
                graph = graph_default and net == "unet"
                e.context = self._context(trt, e.engine, graph)
                e.manual_graph = graph and self.flavour == "tensorrt"
                need = max(need, _device_memory_size(e.engine))
                self._engines.append(e)
        self._shared = cuda.malloc(need)
        for e in self._engines:
            if hasattr(e.context, "set_device_memory"):
                e.context.set_device_memory(self._shared, need)
            else:  # TensorRT 10.0
                e.context.device_memory = self._shared
            self._allocate(trt, e)
        log.info("TensorRT %s: %d engines from %s", version, len(self._engines), edir)
        return {
            net: _Runner(net, model.dims, model.precision(net), engines, self)
            for net, engines in by_net.items()
        }

    def _context(self, trt, engine, graph: bool):
        user = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(engine, "create_runtime_config"):
            rc = engine.create_runtime_config()
            rc.set_execution_context_allocation_strategy(user)
            if graph and self.flavour == "tensorrt_rtx":
                rc.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            ctx = engine.create_execution_context(rc)
        else:
            ctx = engine.create_execution_context(user)
        if ctx is None:
            raise BackendUnavailableError(
                "TensorRT could not create an execution context (out of GPU memory?)",
                fix="close other GPU programs, or use --backend ort.",
            )
        return ctx

    def _allocate(self, trt, e: _Engine) -> None:
        """Device buffers for every I/O tensor at the profile's largest shapes, bound once."""
        eng, ctx, e.buffers = e.engine, e.context, {}
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for n in inputs:
            ctx.set_input_shape(n, tuple(eng.get_tensor_profile_shape(n, 0)[2]))
        for n in names:
            shape = tuple(ctx.get_tensor_shape(n))
            itemsize = np.dtype(trt.nptype(eng.get_tensor_dtype(n))).itemsize
            e.buffers[n] = self._cuda.malloc(int(np.prod(shape, dtype=np.int64)) * itemsize)
            ctx.set_tensor_address(n, e.buffers[n])

    # ---- running -------------------------------------------------------------------
    def _execute(self, e: _Engine, key: tuple) -> None:
        cuda, stream = self._cuda, self._stream
        if e.manual_graph and e.graph is not None and e.graph[0] == key:
            cuda.launch(e.graph[2], stream)
            return
        if not e.context.execute_async_v3(stream):
            raise BackendUnavailableError(
                f"TensorRT failed to run {e.path.name} (see the log above)",
                fix="use --backend ort, and report the log.",
            )
        if e.manual_graph:  # capture this shape's enqueue for the next steps
            self._drop_graph(e)
            try:
                cuda.begin_capture(stream)
                try:
                    e.context.execute_async_v3(stream)
                finally:
                    graph = cuda.end_capture(stream)
                e.graph = (key, graph, cuda.instantiate(graph))
            except Exception as err:
                log.warning("CUDA graph capture of %s failed (%s); running without", e.path, err)
                e.manual_graph = False

    def _drop_graph(self, e: _Engine) -> None:
        if e.graph is not None:
            self._cuda.destroy_graph(e.graph[1], e.graph[2])
            e.graph = None

    def close(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            if self._stream:
                cuda.sync(self._stream)
            for e in self._engines:
                self._drop_graph(e)
                for ptr in (e.buffers or {}).values():
                    cuda.free(ptr)
            cuda.free(self._shared)
            if self._stream:
                cuda.lib.cudaStreamDestroy(ctypes.c_void_p(self._stream))
        for e in self._engines:  # contexts before engines
            e.context = None
        self._engines, self._shared, self._stream = [], 0, 0


def _device_memory_size(engine) -> int:
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


class _Runner:
    """One network: picks the engine whose profile covers the feeds, numpy in and out."""

    def __init__(self, name, dims, precision, engines: list[_Engine], backend: TensorRTBackend):
        self.name, self.dims, self.precision = name, dims, precision
        self.engines, self.backend = engines, backend
        self.spec = NETWORKS[name]

    def _engine_for(self, values: dict) -> _Engine:
        for e in self.engines:
            if profile_covers(e.axes, values):
                return e
        have = ", ".join(e.path.name for e in self.engines)
        want = ", ".join(f"{k}={v}" for k, v in values.items())
        raise ArtifactMismatchError(
            f"no {self.name} engine covers this request ({want}); built: {have}",
            fix=f"build engines for it, e.g. iap-rt engines build --model {self.backend.model_path} "
            "--batch 1:4 --resolution 256:768 --force (or --no-guidance), or use --backend ort.",
        )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.spec.check_feeds(feeds, self.dims, self.precision)
        e = self._engine_for(values)
        cuda, stream, ctx = self.backend._cuda, self.backend._stream, e.context
        held = []  # host arrays must outlive the async copies
        for name in self.spec.input_names:
            arr = np.ascontiguousarray(feeds[name])
            held.append(arr)
            if not ctx.set_input_shape(name, arr.shape):
                raise ArtifactMismatchError(
                    f"{e.path.name} rejects {name} of shape {arr.shape} (outside its profile)",
                    fix=f"rebuild: {rebuild_command(self.backend.model_path, e.sidecar)}",
                )
            cuda.copy(e.buffers[name], arr.ctypes.data, arr.nbytes, cuda.H2D, stream)
        self.backend._execute(e, tuple(a.shape for a in held))
        outs = {}
        for t in self.spec.outputs:
            dtype = self.backend._trt.nptype(e.engine.get_tensor_dtype(t.name))
            out = np.empty(tuple(ctx.get_tensor_shape(t.name)), dtype)
            cuda.copy(out.ctypes.data, e.buffers[t.name], out.nbytes, cuda.D2H, stream)
            outs[t.name] = out
        cuda.sync(stream)
        return outs
