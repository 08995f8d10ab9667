"""The CUDA runtime and driver, through ctypes, and what the GPU is.

:class:`CudaRuntime` wraps the few CUDA runtime calls the TensorRT backend needs (device
memory, one stream, async copies, CUDA graph capture) on the ``libcudart`` that polygraphy
locates (``polygraphy.cuda``), never torch. Each call follows its C signature in
``cuda_runtime_api.h`` (the argument order is pinned by a test against a strict fake).
:func:`gpu_info` names the device engines are checked against (None where there is no usable
GPU) and :func:`no_gpu_reason` says why not: polygraphy missing, no CUDA runtime, no driver,
no device. :func:`driver_devices` asks the driver alone (``libcuda``), which is all ONNX
Runtime's CUDA provider needs besides its own libraries.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

from iap_rt.errors import BackendUnavailableError

log = logging.getLogger("iap_rt.cuda")


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device engines are checked against."""

    index: int
    name: str
    cc: tuple[int, int]  # compute capability (major, minor)

    @property
    def cc_str(self) -> str:
        return f"{self.cc[0]}.{self.cc[1]}"


# cudaError_t values worth naming in a message
CUDA_ERRORS = {
    3: "cudaErrorInitializationError",
    34: "cudaErrorStubLibrary (a stub libcuda: no NVIDIA driver)",
    35: "cudaErrorInsufficientDriver (the NVIDIA driver is older than this CUDA runtime)",
    100: "cudaErrorNoDevice (no CUDA-capable GPU)",
    999: "cudaErrorUnknown",
}


class CudaRuntime:
    """The few CUDA runtime calls the backend needs, on the library polygraphy locates
    (or ``lib``, any object with the ``cuda*`` functions: tests pass a fake)."""

    H2D, D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost
    # cudaStreamCaptureModeThreadLocal: only this thread's unsafe CUDA calls (cudaMalloc, ...)
    # break the capture, not those of other threads (ORT, Python threads) in the process
    CAPTURE_THREAD_LOCAL = 1

    def __init__(self, lib=None):
        if lib is None:
            from polygraphy import cuda as pcuda

            lib = pcuda.wrapper().handle
        self.lib = lib

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

    def device_count_rc(self) -> tuple[int, int]:
        """(devices, cudaError_t of cudaGetDeviceCount)."""
        n = ctypes.c_int(0)
        rc = int(self.lib.cudaGetDeviceCount(ctypes.byref(n)))
        return (n.value if rc == 0 else 0), rc

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
        # cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode)
        rc = self.lib.cudaStreamBeginCapture(
            ctypes.c_void_p(stream), ctypes.c_int(self.CAPTURE_THREAD_LOCAL)
        )
        self.check(rc, "cudaStreamBeginCapture")

    def end_capture(self, stream: int) -> int:
        # cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *pGraph): the stream first
        graph = ctypes.c_void_p()
        rc = self.lib.cudaStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph))
        self.check(rc, "cudaStreamEndCapture")
        return graph.value or 0

    def instantiate(self, graph: int) -> int:
        # CUDA >= 12: cudaGraphInstantiate(cudaGraphExec_t *pGraphExec, cudaGraph_t graph,
        # unsigned long long flags)
        return self._ptr_out("cudaGraphInstantiate", ctypes.c_void_p(graph), ctypes.c_ulonglong(0))

    def destroy_stream(self, stream: int) -> None:
        if stream:
            self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))

    def launch(self, graph_exec: int, stream: int) -> None:
        rc = self.lib.cudaGraphLaunch(ctypes.c_void_p(graph_exec), ctypes.c_void_p(stream))
        self.check(rc, "cudaGraphLaunch")

    def destroy_graph(self, graph: int, graph_exec: int) -> None:
        if graph_exec:
            self.lib.cudaGraphExecDestroy(ctypes.c_void_p(graph_exec))
        if graph:
            self.lib.cudaGraphDestroy(ctypes.c_void_p(graph))


@dataclass(frozen=True)
class GpuProbe:
    """What :func:`probe` found: the GPU, or why there is none usable here."""

    gpu: GpuInfo | None
    reason: str | None = None  # None when ``gpu`` is set


@functools.lru_cache(maxsize=8)
def probe(index: int = 0) -> GpuProbe:
    """The CUDA device ``index`` through the CUDA runtime, or the reason there is none."""
    try:
        cuda = CudaRuntime()
    except ImportError as e:
        return GpuProbe(
            None,
            f"polygraphy is not installed ({e}); the TensorRT backend reaches the CUDA runtime "
            "through it: pip install 'iap-rt[trt]'",
        )
    except Exception as e:  # OSError from ctypes, PolygraphyException: no libcudart
        return GpuProbe(
            None,
            f"the CUDA runtime library (libcudart) could not be loaded ({str(e)[:200]}): "
            "install the CUDA runtime (pip install nvidia-cuda-runtime) or put its directory "
            "on LD_LIBRARY_PATH",
        )
    try:
        count, rc = cuda.device_count_rc()
        if rc != 0:
            return GpuProbe(
                None,
                f"cudaGetDeviceCount failed with cudaError {rc} "
                f"({CUDA_ERRORS.get(rc, 'see cuda_runtime_api.h')}): check nvidia-smi",
            )
        if count <= index:
            return GpuProbe(None, f"no CUDA device {index}: {count} visible")
        return GpuProbe(cuda.device(index))
    except Exception as e:  # a broken driver: say so, do not crash the caller
        log.debug("CUDA device query failed: %s", e)
        return GpuProbe(None, f"querying CUDA device {index} failed: {str(e)[:200]}")


def gpu_info(index: int = 0) -> GpuInfo | None:
    """The CUDA device ``index``, or None without a usable GPU/driver/CUDA runtime/polygraphy
    (:func:`no_gpu_reason` says which)."""
    return probe(index).gpu


def no_gpu_reason(index: int = 0) -> str:
    """Why :func:`gpu_info` found no GPU ``index`` (what is missing)."""
    return probe(index).reason or "a CUDA GPU is visible"


def driver_devices() -> tuple[int, str | None]:
    """(CUDA devices the NVIDIA driver reports, why none) through ``libcuda`` alone
    (``cuInit`` + ``cuDeviceGetCount``): what ONNX Runtime's CUDA provider needs of the
    machine besides its own CUDA libraries."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 is not on this machine)"
    rc = int(lib.cuInit(ctypes.c_uint(0)))
    if rc != 0:  # CUresult: 100 = CUDA_ERROR_NO_DEVICE, 35/34 = driver problems
        return 0, f"the NVIDIA driver did not initialise (cuInit returned CUresult {rc})"
    n = ctypes.c_int(0)
    rc = int(lib.cuDeviceGetCount(ctypes.byref(n)))
    if rc != 0 or n.value == 0:
        return 0, "the NVIDIA driver reports no CUDA device"
    return n.value, None
