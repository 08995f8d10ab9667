"""The CUDA runtime, through ctypes, and what the GPU is.

:class:`CudaRuntime` wraps the few CUDA runtime calls the TensorRT backend needs (device
memory, one stream, async copies, CUDA graph capture) on the ``libcudart`` that polygraphy
locates (``polygraphy.cuda``), never torch. :func:`gpu_info` names the device engines are
checked against; it answers None where there is no usable GPU.
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


class CudaRuntime:
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
        cuda = CudaRuntime()
        if cuda.device_count() <= index:
            return None
        return cuda.device(index)
    except Exception as e:  # no libcudart, no driver, no device: all mean "no GPU here"
        log.debug("no CUDA GPU: %s", e)
        return None
