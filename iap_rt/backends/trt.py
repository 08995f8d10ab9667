"""TensorRT runtime backend: loads a model directory's checked engines and runs them.

Imported lazily (``--backend trt`` or ``auto``); the ONNX Runtime path never imports it.
It works with either TensorRT flavour, ``tensorrt`` (>= 10) or ``tensorrt_rtx``: the
Python APIs are the same. Which engine belongs to this GPU and TensorRT, and the checks done
before TensorRT sees a byte, are the engine-artifact rules of :mod:`iap_rt.enginedir`.

Running: device buffers are allocated once per engine at its profile's largest shapes, one
stream, ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3``, and one
activation buffer shared by all engines (they run one after another on the stream), sized
to the largest. Optional CUDA graph of the UNet step: TensorRT-RTX's built-in capture,
or a captured ``execute_async_v3`` for full TensorRT. CUDA goes through
:class:`iap_rt.cuda.CudaRuntime`, never torch.

TensorRT-RTX compiles its kernels on this GPU when a context first runs (JIT): the backend
loads its runtime cache from beside the engines (``engines/<gpu-tag>/runtime-smXY.cache``)
and saves it back on :meth:`TensorRTBackend.close`, so only the first process on a GPU
compiles; ``kernel_specialization="eager"`` compiles the shape-specialised kernels before
the first image instead of running it on fallback kernels (benches and tests use it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iap_rt import cuda as cudart
from iap_rt import enginedir as ed
from iap_rt.backends.base import Backend
from iap_rt.cuda import GpuInfo
from iap_rt.errors import (
    ArtifactMismatchError,
    ArtifactNotFoundError,
    BackendUnavailableError,
    ConfigError,
)
from iap_rt.fileio import write_bytes_atomic
from iap_rt.modeldir import ModelDir
from iap_rt.specs import OPTIONAL_NETWORKS

log = logging.getLogger("iap_rt.trt")


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
            fix=f"rebuild it: {ed.rebuild_command(model.path, sc)}",
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
    --cuda-graph``). ``kernel_specialization`` (TensorRT-RTX): ``lazy`` (its default: the
    first runs of a new shape use fallback kernels while the specialised ones compile),
    ``eager`` (compile them before the first run) or ``none``. ``runtime_cache``: load/save
    TensorRT-RTX's JIT runtime cache beside the engines. Options meant for other backends
    are ignored.
    """

    name = "trt"
    SPECIALIZATIONS = ("lazy", "eager", "none")

    def __init__(
        self,
        flavour: str = "auto",
        cuda_graph: bool | None = None,
        device: int = 0,
        kernel_specialization: str = "lazy",
        runtime_cache: bool = True,
        **_,
    ):
        if flavour != "auto" and flavour not in ed.FLAVOURS:
            raise ConfigError(
                f"unknown TensorRT flavour {flavour!r}", fix=f"use auto, {', '.join(ed.FLAVOURS)}."
            )
        if kernel_specialization not in self.SPECIALIZATIONS:
            raise ConfigError(
                f"unknown kernel specialization {kernel_specialization!r}",
                fix=f"use one of {', '.join(self.SPECIALIZATIONS)}.",
            )
        self.flavour, self.cuda_graph, self.index = flavour, cuda_graph, device
        self.kernel_specialization = kernel_specialization
        self.use_runtime_cache = runtime_cache
        self._runtime_cache = None  # TensorRT-RTX IRuntimeCache shared by every context
        self._runtime_cache_path: Path | None = None
        self._gpu: GpuInfo | None = None
        self._trt = None
        self._cuda: cudart.CudaRuntime | None = None
        self._stream = 0
        self._shared = 0  # activation memory shared by all engines
        self._engines: list[_Engine] = []
        self.model_path = None

    @property
    def device(self) -> str:
        if self._gpu is None:
            return f"cuda:{self.index}"
        return f"cuda:{self.index} ({self._gpu.name}, {self.flavour} {ed.trt_version(self._trt)})"

    # ---- loading -------------------------------------------------------------------
    def _pick(self, model: ModelDir, gpu: GpuInfo) -> tuple[str, Path]:
        flavours = ed.installed_flavours() if self.flavour == "auto" else [self.flavour]
        if not flavours:
            ed.import_trt("tensorrt_rtx")  # raises the install hint
        reasons = {f: ed.unsupported_gpu_reason(f, ed.import_trt(f), gpu) for f in flavours}
        if all(reasons.values()):  # e.g. TensorRT-RTX 1.7 on an H100/H200 (SM90)
            raise BackendUnavailableError(
                "no installed TensorRT runs on this GPU: " + "; ".join(reasons.values()),
                fix="use --backend ort (ONNX Runtime's CUDA provider), or install full TensorRT "
                "(pip install tensorrt-cu13), which runs on every recent NVIDIA GPU.",
            )
        flavours = [f for f in flavours if not reasons[f]]
        for f in flavours:
            d = ed.find_engine_dir(model, f, gpu)
            if d is not None:
                return f, d
        found = sorted(p.name for p in model.engines_dir.glob("*") if p.is_dir())
        raise ArtifactNotFoundError(
            f"{model.engines_dir} has no engines for this GPU ({gpu.name}, compute capability "
            f"{gpu.cc_str}) and TensorRT {'/'.join(flavours)}; engine directories found: "
            f"{found or 'none'}",
            fix=f"build them: {ed.rebuild_command(model.path, None, flavours[0])}"
            " (or use --backend ort).",
        )

    def load(self, model: ModelDir, networks=None) -> dict[str, _Runner]:
        """Every engine of the model's networks: the core ones required, an optional one when
        its engine exists (the engines share one activation buffer, so they load together;
        ``networks`` is not used)."""
        gpu = cudart.gpu_info(self.index)
        if gpu is None:
            raise BackendUnavailableError(
                f"no CUDA GPU {self.index} for TensorRT: {cudart.no_gpu_reason(self.index)}",
                fix="use --backend ort, or run on a machine with an NVIDIA GPU.",
            )
        self.close()
        self.flavour, edir = self._pick(model, gpu)
        trt = self._trt = ed.import_trt(self.flavour)
        self._gpu, self.model_path = gpu, model.path
        version = ed.trt_version(trt)
        self._cuda = cuda = cudart.CudaRuntime()
        cuda.set_device(self.index)  # TensorRT deserializes onto the current device
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.use_runtime_cache:
            self._runtime_cache_path = ed.runtime_cache_path(edir, gpu)
        by_net: dict[str, list[_Engine]] = {}
        # 1. check every sidecar and engine file, then deserialize
        for net in model.networks:
            paths = ed.sidecars(edir, net)
            if not paths and net in OPTIONAL_NETWORKS:  # editing without engines: not here
                log.info("%s has no engine for %s; requests that need it are refused", edir, net)
                continue
            if not paths:
                raise ArtifactNotFoundError(
                    f"{edir} has no engine for network '{net}'",
                    fix=f"build it: {ed.rebuild_command(model.path, None, self.flavour)}",
                )
            for p in paths:
                sc = ed.read_sidecar(p, model.path)
                ed.check_sidecar(sc, p, model, flavour=self.flavour, version=version, gpu=gpu)
                data = ed.read_verified_engine(p, sc, model)
                path = ed.engine_path(p, sc)
                _check_validity(trt, runtime, data, path, sc, model)
                engine = _deserialize(runtime, data)
                del data
                if engine is None:
                    raise ArtifactMismatchError(
                        f"TensorRT {version} could not deserialize {path} (see the log above)",
                        fix=f"rebuild it: {ed.rebuild_command(model.path, sc)}",
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
            net: _Runner(model.spec(net), model.dims, model.precision(net), engines, self)
            for net, engines in by_net.items()
        }

    def _context(self, trt, engine, graph: bool):
        user = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(engine, "create_runtime_config"):
            rc = engine.create_runtime_config()
            rc.set_execution_context_allocation_strategy(user)
            if self.flavour == "tensorrt_rtx":
                if graph:
                    rc.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                self._jit_settings(trt, rc)
            ctx = engine.create_execution_context(rc)
        else:
            ctx = engine.create_execution_context(user)
        if ctx is None:
            raise BackendUnavailableError(
                "TensorRT could not create an execution context (out of GPU memory?)",
                fix="close other GPU programs, or use --backend ort.",
            )
        return ctx

    def _jit_settings(self, trt, rc) -> None:
        """TensorRT-RTX's JIT: kernel specialisation strategy and the shared runtime cache."""
        strategy = trt.DynamicShapesKernelSpecializationStrategy
        rc.dynamic_shapes_kernel_specialization_strategy = getattr(
            strategy, self.kernel_specialization.upper()
        )
        if self._runtime_cache_path is None:
            return
        if self._runtime_cache is None:
            self._runtime_cache = rc.create_runtime_cache()
            path = self._runtime_cache_path
            if path.is_file() and not self._runtime_cache.deserialize(path.read_bytes()):
                log.info("runtime cache %s is from another GPU/driver/TensorRT: rebuilding", path)
        rc.set_runtime_cache(self._runtime_cache)

    def save_runtime_cache(self) -> Path | None:
        """Write TensorRT-RTX's runtime cache beside the engines (atomically); None where
        there is none or the engine directory is read-only."""
        if self._runtime_cache is None or self._runtime_cache_path is None:
            return None
        try:
            write_bytes_atomic(self._runtime_cache_path, self._runtime_cache.serialize())
        except OSError as e:  # an installed, read-only model directory: compile next time
            log.warning("could not save the runtime cache %s: %s", self._runtime_cache_path, e)
            return None
        return self._runtime_cache_path

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
            self.save_runtime_cache()  # the kernels compiled in this process
            for e in self._engines:
                self._drop_graph(e)
                for ptr in (e.buffers or {}).values():
                    cuda.free(ptr)
            cuda.free(self._shared)
            cuda.destroy_stream(self._stream)
        for e in self._engines:  # contexts before engines
            e.context = None
        self._engines, self._shared, self._stream = [], 0, 0
        self._runtime_cache = None


def _device_memory_size(engine) -> int:
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


class _Runner:
    """One network: picks the engine whose profile covers the feeds, numpy in and out."""

    def __init__(self, spec, dims, precision, engines: list[_Engine], backend: TensorRTBackend):
        self.name, self.spec, self.dims, self.precision = spec.name, spec, dims, precision
        self.engines, self.backend = engines, backend

    def _engine_for(self, values: dict) -> _Engine:
        for e in self.engines:
            if ed.profile_covers(e.axes, values):
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
                    fix=f"rebuild: {ed.rebuild_command(self.backend.model_path, e.sidecar)}",
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
