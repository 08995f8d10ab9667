"""Which ONNX Runtime wheel provides the ``onnxruntime`` module here, its execution
providers, what stands between it and a CUDA run, with the command that fixes it, and the
CUDA library preloading a session needs (the ort backend imports all of this from here).

The CPU wheel ``onnxruntime`` and the GPU wheel ``onnxruntime-gpu`` install the same module,
so pip lets both be installed at once and the module is whichever came last. iap-rt's base
install therefore carries neither: ``pip install 'iap-rt[cpu]'`` adds the CPU wheel,
``pip install 'iap-rt[gpu]'`` the GPU wheel with its CUDA and cuDNN libraries (nvidia-*
wheels), and the runtime takes whichever is installed (README, "Installing for a GPU").
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from iap_rt.errors import BackendUnavailableError

# the wheels that install the ``onnxruntime`` module (one at a time, please)
ORT_DISTS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)
CPU_INSTALL = "pip install 'iap-rt[cpu]'"
GPU_INSTALL = "pip install 'iap-rt[gpu]'"


def installed_dists() -> dict[str, str]:
    """``{distribution: version}`` of every installed wheel that provides ``onnxruntime``."""
    found = {}
    for dist in ORT_DISTS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def dist_dir(dist: str) -> Path | None:
    """The directory ``dist`` installed its files into (site-packages, a --target folder)."""
    try:
        return Path(str(importlib.metadata.distribution(dist).locate_file(""))).resolve()
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None


def _split_active(dists: dict[str, str], module_file: str | None):
    """(the wheels installed where the imported module lives, those elsewhere on the path and
    shadowed by it). Two wheels in one directory have overwritten each other's files."""
    if not module_file:
        return dict(dists), {}
    here = Path(module_file).resolve().parent.parent
    active = {d: v for d, v in dists.items() if dist_dir(d) in (here, None)}
    if not active:
        return dict(dists), {}
    return active, {d: v for d, v in dists.items() if d not in active}


@dataclass(frozen=True)
class OrtStatus:
    """What ``iap-rt info`` says about ONNX Runtime."""

    dists: dict[str, str]  # installed wheels providing the module
    version: str | None  # onnxruntime.__version__ (None: the module does not import)
    providers: tuple[str, ...]
    cuda_problem: str | None  # None: the CUDA execution provider started here
    cuda_fix: str | None
    shadowed: dict[str, str] = field(default_factory=dict)  # wheels elsewhere on the path

    @property
    def flavour(self) -> str:
        """``onnxruntime-gpu 1.31.1``, ``onnxruntime 1.32.0``, ``not installed`` or the
        conflicting wheels (and any wheel the imported one shadows)."""
        if not self.dists:
            return "not installed"
        text = " + ".join(f"{d} {v}" for d, v in self.dists.items())
        if self.shadowed:
            text += " (shadows " + ", ".join(f"{d} {v}" for d, v in self.shadowed.items()) + ")"
        return text

    def lines(self) -> list[str]:
        out = [f"onnxruntime: {self.flavour}"]
        if self.version is not None:
            out[0] += f" (module {self.version}); providers {', '.join(self.providers)}"
        if self.cuda_problem is None:
            out.append("CUDA: ready (CUDAExecutionProvider started)")
        else:
            out.append(f"CUDA: not usable: {self.cuda_problem}")
            out.append(f"  fix: {self.cuda_fix}")
        return out


def ort_status(try_cuda: bool = True) -> OrtStatus:
    """The installed ONNX Runtime, its providers, and whether its CUDA provider starts
    (``try_cuda``: open a session of a small model on it; ONNX Runtime otherwise only warns
    and runs on the CPU)."""
    dists = installed_dists()
    if importlib.util.find_spec("onnxruntime") is None:
        return OrtStatus(dists, None, (), "ONNX Runtime is not installed",
                         f"{CPU_INSTALL}, or on an NVIDIA GPU: {GPU_INSTALL}.")  # fmt: skip
    import onnxruntime as ort

    providers = tuple(ort.get_available_providers())
    dists, shadowed = _split_active(dists, getattr(ort, "__file__", None))
    status = OrtStatus(dists, ort.__version__, providers, None, None, shadowed)
    if len(dists) > 1:
        return _problem(
            status,
            f"{' and '.join(dists)} are {'both' if len(dists) == 2 else 'all'} installed in one "
            "place; they share the onnxruntime module, which is whichever was installed last",
            f"pip uninstall -y {' '.join(dists)} && {GPU_INSTALL} (or {CPU_INSTALL} without "
            "a GPU).",
        )
    if "CUDAExecutionProvider" not in providers:
        which = next(iter(dists), "this onnxruntime")
        return _problem(
            status,
            f"{which} is a build without the CUDA execution provider",
            f"pip uninstall -y {which} && {GPU_INSTALL}.",
        )
    if not try_cuda:
        return status
    why = cuda_start_problem()
    if why is None:
        return status
    from iap_rt import cuda

    devices, driver = cuda.driver_devices()
    if devices == 0:
        return _problem(
            status,
            f"the CUDA provider is installed but did not start: {driver}",
            "run on a machine with an NVIDIA GPU and a driver for CUDA 13 (>= 580); the "
            "CPU provider works meanwhile (--backend ort --device cpu).",
        )
    return _problem(
        status,
        f"the CUDA provider did not start ({why}): its CUDA/cuDNN libraries did not load",
        f"{GPU_INSTALL} (brings them as nvidia-* wheels; onnxruntime-gpu[cuda,cudnn]), or put "
        "the CUDA and cuDNN versions your onnxruntime-gpu was built for on LD_LIBRARY_PATH.",
    )


def _problem(status: OrtStatus, problem: str, fix: str) -> OrtStatus:
    return replace(status, cuda_problem=problem, cuda_fix=fix)


def cuda_start_problem() -> str | None:
    """Open the embedded model's VAE decoder on the CUDA provider; None if the provider
    started, else what ONNX Runtime ran it on instead (or its error)."""
    import onnxruntime as ort

    from iap_rt.modeldir import ModelDir, default_model_dir

    preload_cuda_libraries()
    path = ModelDir.open(default_model_dir()).network_path("vae_decoder")
    so = ort.SessionOptions()
    so.log_severity_level = 4  # ONNX Runtime logs the failed library load itself: quiet
    try:
        ort.set_default_logger_severity(4)
        with warnings.catch_warnings():  # "CUDAExecutionProvider is not available": our answer
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(
                str(path), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return str(e).splitlines()[0][:200]
    if "CUDAExecutionProvider" in session.get_providers():
        return None
    return f"the session fell back to {', '.join(session.get_providers())}"


def available_providers() -> list[str]:
    """The execution providers of the installed ONNX Runtime (raises with the install
    command when there is none)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailableError(
            f"ONNX Runtime is not installed ({e})",
            fix=f"{CPU_INSTALL}, or on an NVIDIA GPU: {GPU_INSTALL}.",
        ) from e
    return list(ort.get_available_providers())


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels where they are installed (onnxruntime-gpu's
    ``preload_dlls``, ONNX Runtime >= 1.21): this runtime never imports torch, which would
    otherwise have loaded them. Missing libraries are reported when a session starts."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload(cuda=True, cudnn=True, msvc=False)
        except Exception:  # noqa: BLE001 - best effort; _open checks the provider started
            pass
