"""The CUDA runtime wrapper against the C signatures, what "no GPU" means, and which GPUs the
installed TensorRT runs on, without a GPU.

:class:`StrictCudart` stands in for ``libcudart``: each function checks its arguments against
the C declaration in ``cuda_runtime_api.h`` (handles by value as ``c_void_p``, out-parameters
as pointers, in the declared order), keeps the state CUDA keeps (allocations, streams, which
stream is capturing) and answers with ``cudaError_t`` codes, so a call with swapped arguments
fails here as it would on a GPU.
"""

from __future__ import annotations

import ctypes
import types

import pytest

from iap_rt import cuda as cudart
from iap_rt import enginedir as ed
from iap_rt.backends import get_backend
from iap_rt.backends import trt as rt
from iap_rt.errors import BackendUnavailableError
from iap_rt.modeldir import ModelDir

SUCCESS, INVALID_VALUE = 0, 1  # cudaError_t
REAL_RUNTIME = cudart.CudaRuntime


def _out(arg, ctype=ctypes.c_void_p):
    """The object an out-parameter points to, or None where ``arg`` is no such pointer."""
    obj = getattr(arg, "_obj", None)  # ctypes.byref(x) keeps x here
    return obj if type(arg).__name__ == "CArgObject" and isinstance(obj, ctype) else None


def _handle(arg):
    return arg.value if isinstance(arg, ctypes.c_void_p) else None


class StrictCudart:
    """libcudart as the C API declares it (see the module docstring)."""

    def __init__(self, devices=1, count_rc=SUCCESS, cc=(9, 0), name=b"NVIDIA H200"):
        self.devices, self.count_rc, self.cc, self.name = devices, count_rc, cc, name
        self.mem: dict[int, ctypes.Array] = {}
        self.streams: set[int] = set()
        self.capturing: dict[int, int] = {}  # stream -> capture mode
        self.graphs: set[int] = set()
        self.execs: dict[int, int] = {}  # exec -> graph
        self.launched: list[tuple[int, int]] = []
        self.calls: list[str] = []
        self._next = 0x1000

    def _new(self) -> int:
        self._next += 0x10
        return self._next

    def __getattribute__(self, name):
        if name.startswith("cuda"):
            object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)

    # cudaError_t cudaGetDeviceCount(int *count)
    def cudaGetDeviceCount(self, count):
        out = _out(count, ctypes.c_int)
        if out is None:
            return INVALID_VALUE
        out.value = self.devices if self.count_rc == SUCCESS else 0
        return self.count_rc

    # cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device)
    def cudaDeviceGetAttribute(self, value, attr, device):
        out = _out(value, ctypes.c_int)
        if out is None or attr not in (75, 76) or not 0 <= device < self.devices:
            return INVALID_VALUE
        out.value = self.cc[0] if attr == 75 else self.cc[1]
        return SUCCESS

    # cudaError_t cudaGetDeviceProperties_v2(cudaDeviceProp *prop, int device)
    def cudaGetDeviceProperties_v2(self, prop, device):
        if not isinstance(prop, ctypes.Array) or len(prop) < 1008:  # sizeof(cudaDeviceProp)
            return INVALID_VALUE
        prop.value = self.name  # char name[256] is the first field
        return SUCCESS

    # cudaError_t cudaSetDevice(int device)
    def cudaSetDevice(self, device):
        return SUCCESS if isinstance(device, int) and 0 <= device < self.devices else 101

    # cudaError_t cudaMalloc(void **devPtr, size_t size)
    def cudaMalloc(self, dev_ptr, size):
        out = _out(dev_ptr)
        if out is None or not isinstance(size, ctypes.c_size_t):
            return INVALID_VALUE
        buf = ctypes.create_string_buffer(size.value)
        self.mem[ctypes.addressof(buf)] = buf
        out.value = ctypes.addressof(buf)
        return SUCCESS

    # cudaError_t cudaFree(void *devPtr)
    def cudaFree(self, ptr):
        return SUCCESS if self.mem.pop(_handle(ptr), None) is not None else INVALID_VALUE

    # cudaError_t cudaStreamCreate(cudaStream_t *pStream)
    def cudaStreamCreate(self, p_stream):
        out = _out(p_stream)
        if out is None:
            return INVALID_VALUE
        out.value = self._new()
        self.streams.add(out.value)
        return SUCCESS

    # cudaError_t cudaStreamDestroy(cudaStream_t stream)
    def cudaStreamDestroy(self, stream):
        s = _handle(stream)
        if s not in self.streams:
            return INVALID_VALUE
        self.streams.discard(s)
        return SUCCESS

    # cudaError_t cudaStreamSynchronize(cudaStream_t stream)
    def cudaStreamSynchronize(self, stream):
        s = _handle(stream)
        if s in self.capturing:
            return 900  # cudaErrorStreamCaptureUnsupported
        return SUCCESS if s in self.streams else INVALID_VALUE

    # cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count,
    #                             cudaMemcpyKind kind, cudaStream_t stream)
    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if not (isinstance(dst, ctypes.c_void_p) and isinstance(src, ctypes.c_void_p)):
            return INVALID_VALUE
        if not isinstance(count, ctypes.c_size_t) or kind not in (1, 2):
            return INVALID_VALUE
        if _handle(stream) not in self.streams:
            return 400  # cudaErrorInvalidResourceHandle
        ctypes.memmove(dst.value, src.value, count.value)
        return SUCCESS

    # cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode)
    def cudaStreamBeginCapture(self, stream, mode):
        s = _handle(stream)
        mode = mode.value if isinstance(mode, ctypes.c_int) else mode
        if s not in self.streams or mode not in (0, 1, 2) or s in self.capturing:
            return INVALID_VALUE
        self.capturing[s] = mode
        return SUCCESS

    # cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *pGraph)
    def cudaStreamEndCapture(self, stream, p_graph):
        s, out = _handle(stream), _out(p_graph)
        if s is None or out is None:
            return INVALID_VALUE
        if s not in self.capturing:
            return 901  # cudaErrorStreamCaptureUnmatched
        del self.capturing[s]
        out.value = self._new()
        self.graphs.add(out.value)
        return SUCCESS

    # cudaError_t cudaGraphInstantiate(cudaGraphExec_t *pGraphExec, cudaGraph_t graph,
    #                                  unsigned long long flags)
    def cudaGraphInstantiate(self, p_exec, graph, flags):
        out, g = _out(p_exec), _handle(graph)
        if out is None or g not in self.graphs or not isinstance(flags, ctypes.c_ulonglong):
            return INVALID_VALUE
        out.value = self._new()
        self.execs[out.value] = g
        return SUCCESS

    # cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream)
    def cudaGraphLaunch(self, graph_exec, stream):
        e, s = _handle(graph_exec), _handle(stream)
        if e not in self.execs or s not in self.streams:
            return INVALID_VALUE
        self.launched.append((e, s))
        return SUCCESS

    def cudaGraphExecDestroy(self, graph_exec):
        return SUCCESS if self.execs.pop(_handle(graph_exec), None) else INVALID_VALUE

    def cudaGraphDestroy(self, graph):
        g = _handle(graph)
        if g not in self.graphs:
            return INVALID_VALUE
        self.graphs.discard(g)
        return SUCCESS


# ---- the wrapper against the C signatures ----------------------------------------------------
def test_every_call_matches_its_c_signature():
    lib = StrictCudart()
    cuda = cudart.CudaRuntime(lib=lib)
    assert cuda.device_count_rc() == (1, 0)
    assert cuda.device(0) == cudart.GpuInfo(0, "NVIDIA H200", (9, 0))
    cuda.set_device(0)
    stream = cuda.stream()
    host = ctypes.create_string_buffer(b"sixteen bytes!!!", 16)
    back = ctypes.create_string_buffer(16)
    dev = cuda.malloc(16)
    cuda.copy(dev, ctypes.addressof(host), 16, cuda.H2D, stream)
    cuda.copy(ctypes.addressof(back), dev, 16, cuda.D2H, stream)
    cuda.sync(stream)
    assert back.raw == host.raw
    cuda.free(dev)
    assert lib.mem == {}
    cuda.destroy_stream(stream)
    assert lib.streams == set()


def test_graph_capture_ends_on_the_captured_stream():
    """cudaStreamEndCapture takes (stream, &graph): the stream must leave capture mode and the
    graph must instantiate and launch on it (the reversed call left the stream capturing)."""
    lib = StrictCudart()
    cuda = cudart.CudaRuntime(lib=lib)
    stream = cuda.stream()
    cuda.begin_capture(stream)
    assert lib.capturing == {stream: cuda.CAPTURE_THREAD_LOCAL}  # other threads may allocate
    graph = cuda.end_capture(stream)
    assert lib.capturing == {} and graph in lib.graphs
    graph_exec = cuda.instantiate(graph)
    cuda.launch(graph_exec, stream)
    assert lib.launched == [(graph_exec, stream)]
    cuda.sync(stream)
    cuda.destroy_graph(graph, graph_exec)
    assert lib.graphs == set() and lib.execs == {}


def test_a_failed_call_raises_with_the_fix():
    lib = StrictCudart()
    cuda = cudart.CudaRuntime(lib=lib)
    with pytest.raises(BackendUnavailableError, match="cudaStreamEndCapture failed") as e:
        cuda.end_capture(cuda.stream())  # never began
    assert "--backend ort" in e.value.fix


class _Context:
    """An execution context whose enqueue shows up inside a capture, as TensorRT's does."""

    def __init__(self, lib):
        self.lib, self.enqueued = lib, []

    def execute_async_v3(self, stream):
        self.enqueued.append(("captured" if stream in self.lib.capturing else "ran", stream))
        return True


def test_full_tensorrt_step_is_captured_once_then_replayed():
    """The backend's own capture path over the real wrapper: step 1 runs and is captured,
    step 2 launches the graph on the backend's stream."""
    lib = StrictCudart()
    backend = rt.TensorRTBackend(cuda_graph=True)
    backend._cuda = cuda = cudart.CudaRuntime(lib=lib)
    backend._stream = cuda.stream()
    ctx = _Context(lib)
    engine = rt._Engine(path=None, sidecar={}, engine=None, context=ctx, manual_graph=True)
    key = ((2, 4, 64, 64),)
    backend._execute(engine, key)
    assert engine.manual_graph and engine.graph is not None, "capture failed"
    assert ctx.enqueued == [("ran", backend._stream), ("captured", backend._stream)]
    assert lib.capturing == {}
    backend._execute(engine, key)
    assert lib.launched == [(engine.graph[2], backend._stream)] and len(ctx.enqueued) == 2
    backend._drop_graph(engine)
    assert lib.graphs == set()


# ---- no GPU: say what is missing --------------------------------------------------------------
@pytest.fixture
def fresh_probe():
    cudart.probe.cache_clear()
    yield
    cudart.probe.cache_clear()


def test_missing_polygraphy_is_named_not_called_no_gpu(monkeypatch, fresh_probe):
    def no_polygraphy(lib=None):
        raise ModuleNotFoundError("No module named 'polygraphy'")

    monkeypatch.setattr(cudart, "CudaRuntime", no_polygraphy)
    assert cudart.gpu_info() is None
    reason = cudart.no_gpu_reason()
    assert "polygraphy is not installed" in reason and "iap-rt[trt]" in reason


@pytest.mark.parametrize(
    "lib, words",
    [
        (StrictCudart(count_rc=35), "cudaError 35 (cudaErrorInsufficientDriver"),
        (StrictCudart(count_rc=100), "cudaErrorNoDevice"),
        (StrictCudart(devices=0), "no CUDA device 0: 0 visible"),
    ],
)
def test_driver_and_device_problems_are_named(monkeypatch, fresh_probe, lib, words):
    monkeypatch.setattr(cudart, "CudaRuntime", lambda: REAL_RUNTIME(lib=lib))
    assert cudart.gpu_info() is None
    assert words in cudart.no_gpu_reason()


def test_trt_backend_error_carries_the_reason(monkeypatch, fresh_probe, model_copy):
    monkeypatch.setattr(cudart, "CudaRuntime", lambda: REAL_RUNTIME(lib=StrictCudart(count_rc=35)))
    with pytest.raises(BackendUnavailableError, match="InsufficientDriver") as e:
        rt.TensorRTBackend().load(ModelDir.open(model_copy))
    assert "--backend ort" in e.value.fix


def test_found_gpu_is_probed_once(monkeypatch, fresh_probe):
    lib = StrictCudart(cc=(8, 9), name=b"NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(cudart, "CudaRuntime", lambda: REAL_RUNTIME(lib=lib))
    assert cudart.gpu_info() == cudart.GpuInfo(0, "NVIDIA GeForce RTX 4090", (8, 9))
    n = lib.calls.count("cudaGetDeviceCount")
    assert cudart.gpu_info() is not None and lib.calls.count("cudaGetDeviceCount") == n


# ---- which GPUs the installed TensorRT runs on ------------------------------------------------
trt_rtx = pytest.importorskip("tensorrt_rtx")
H200 = cudart.GpuInfo(0, "NVIDIA H200", (9, 0))
A100 = cudart.GpuInfo(0, "NVIDIA A100-SXM4-80GB", (8, 0))
RTX_4090 = cudart.GpuInfo(0, "NVIDIA GeForce RTX 4090", (8, 9))


def test_tensorrt_rtx_lists_its_own_compute_capabilities():
    ccs = ed.supported_ccs(trt_rtx)
    assert {(8, 6), (8, 9), (12, 0)} <= set(ccs)
    assert (9, 0) not in ccs and (10, 0) not in ccs  # no Hopper, no data-centre Blackwell
    assert ed.unsupported_gpu_reason("tensorrt_rtx", trt_rtx, RTX_4090) is None
    reason = ed.unsupported_gpu_reason("tensorrt_rtx", trt_rtx, H200)
    assert "this GPU (NVIDIA H200) is 9.0" in reason and "8.9" in reason
    assert ed.supported_ccs(types.SimpleNamespace()) is None  # full TensorRT: no list
    assert ed.portable_ccs(trt_rtx) == ((8, 6), (8, 9), (12, 0))


@pytest.fixture
def rtx_engines(model_copy, monkeypatch):
    """Portable TensorRT-RTX engines of the embedded model + the real tensorrt_rtx module."""
    from test_engine_sidecar import write_engine

    from iap_rt.specs import NETWORKS

    for net in NETWORKS:
        write_engine(model_copy, net, trt_version=ed.trt_version(trt_rtx))
    monkeypatch.setattr(ed, "installed_flavours", lambda: ["tensorrt_rtx"])
    monkeypatch.setattr(ed, "import_trt", lambda flavour: trt_rtx)
    return ModelDir.open(model_copy)


def test_auto_falls_back_to_onnx_runtime_on_an_h200(rtx_engines, monkeypatch):
    monkeypatch.setattr(cudart, "gpu_info", lambda index=0: RTX_4090)
    assert ed.engines_usable(rtx_engines) is True
    monkeypatch.setattr(cudart, "gpu_info", lambda index=0: H200)
    assert ed.find_engine_dir(rtx_engines, "tensorrt_rtx", H200) is None
    assert ed.engines_usable(rtx_engines) is False
    assert get_backend("auto", rtx_engines).name == "ort"
    with pytest.raises(BackendUnavailableError, match="no installed TensorRT runs on this GPU"):
        rt.TensorRTBackend().load(rtx_engines)


def test_portable_engines_are_not_claimed_for_an_a100(rtx_engines, monkeypatch):
    assert ed.find_engine_dir(rtx_engines, "tensorrt_rtx", A100) is None
    side = next((rtx_engines.engines_dir / "tensorrt_rtx-portable").glob("unet.*.json"))
    problems = ed.sidecar_problems(
        ed.read_sidecar(side), rtx_engines, flavour="tensorrt_rtx",
        version=ed.trt_version(trt_rtx), gpu=A100,
    )  # fmt: skip
    assert problems and "portable set (8.6, 8.9, 12.0)" in problems[0]
