"""``iap-rt info`` names the ONNX Runtime wheel, its providers and what a CUDA run lacks,
with the fix; the packaging keeps the CPU and GPU wheels apart (each its own extra, the base
install neither). Installed wheels, providers and the driver are mocked here; a fresh venv
with the real GPU wheel is tests/integration/test_gpu_install.py."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from iap_rt import cuda, ortinfo
from iap_rt.ortinfo import ort_status

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _names(reqs):
    return {re.split(r"[\[<>=~! ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_packaging_keeps_the_two_onnxruntime_wheels_apart():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not any(n.startswith("onnxruntime") for n in _names(project["dependencies"]))
    assert _names(extras["cpu"]) == {"onnxruntime"}
    assert _names(extras["gpu"]) == {"onnxruntime-gpu"}
    assert "cuda,cudnn" in extras["gpu"][0]  # the CUDA libraries come with it
    for name, reqs in extras.items():  # no other extra brings either wheel in
        if name not in ("cpu", "gpu", "all"):
            assert not any(n.startswith("onnxruntime") for n in _names(reqs)), name
    assert "cpu" in extras["all"][0] and "gpu" not in extras["all"][0]


@pytest.fixture
def fake_ort(monkeypatch):
    """``set(dists, providers)``: the installed wheels and the module's providers."""
    module = types.ModuleType("onnxruntime")
    module.__version__ = "1.31.1"
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    monkeypatch.setattr(ortinfo.importlib.util, "find_spec", lambda name: object())

    def set_(dists, providers):
        monkeypatch.setattr(ortinfo, "installed_dists", lambda: dict(dists))
        module.get_available_providers = lambda: list(providers)

    return set_


GPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_the_cpu_wheel_says_how_to_get_cuda(fake_ort):
    fake_ort({"onnxruntime": "1.32.0"}, ["CPUExecutionProvider"])
    lines = ort_status().lines()
    assert lines[0].startswith("onnxruntime: onnxruntime 1.32.0 (module 1.31.1); providers CPU")
    assert (
        lines[1] == "CUDA: not usable: onnxruntime is a build without the CUDA execution provider"
    )
    assert lines[2] == "  fix: pip uninstall -y onnxruntime && pip install 'iap-rt[gpu]'."


def test_both_wheels_installed_is_named_as_the_mess_it_is(fake_ort):
    fake_ort({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}, GPU)
    s = ort_status()
    assert s.flavour == "onnxruntime 1.32.0 + onnxruntime-gpu 1.31.1"
    assert "onnxruntime and onnxruntime-gpu are both installed in one place" in s.cuda_problem
    assert s.cuda_fix.startswith("pip uninstall -y onnxruntime onnxruntime-gpu && pip install")


def test_a_wheel_in_a_folder_earlier_on_the_path_shadows_the_other(fake_ort, monkeypatch):
    """The device check installs onnxruntime-gpu into a --target folder ahead of the system's
    CPU wheel: the imported module is the GPU one, and info says it shadows the other."""
    fake_ort({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}, GPU)
    sys.modules["onnxruntime"].__file__ = "/tmp/iap/site/onnxruntime/__init__.py"
    dirs = {"onnxruntime-gpu": Path("/tmp/iap/site"), "onnxruntime": Path("/usr/lib/site")}
    monkeypatch.setattr(ortinfo, "dist_dir", dirs.get)
    monkeypatch.setattr(ortinfo, "cuda_start_problem", lambda: None)
    s = ort_status()
    assert s.flavour == "onnxruntime-gpu 1.31.1 (shadows onnxruntime 1.32.0)"
    assert s.cuda_problem is None


def test_gpu_wheel_ready_or_what_it_lacks(fake_ort, monkeypatch):
    fake_ort({"onnxruntime-gpu": "1.31.1"}, GPU)
    monkeypatch.setattr(ortinfo, "cuda_start_problem", lambda: None)
    assert ort_status().lines()[1] == "CUDA: ready (CUDAExecutionProvider started)"

    monkeypatch.setattr(ortinfo, "cuda_start_problem", lambda: "fell back to CPU")
    monkeypatch.setattr(cuda, "driver_devices", lambda: (0, "no NVIDIA driver (libcuda.so.1 "
                        "is not on this machine)"))  # fmt: skip
    s = ort_status()
    assert s.cuda_problem == (
        "the CUDA provider is installed but did not start: no NVIDIA driver (libcuda.so.1 is "
        "not on this machine)"
    )
    monkeypatch.setattr(cuda, "driver_devices", lambda: (1, None))  # a GPU, libraries missing
    s = ort_status()
    assert "CUDA/cuDNN libraries did not load" in s.cuda_problem
    assert s.cuda_fix.startswith("pip install 'iap-rt[gpu]'")


def test_no_onnxruntime_at_all(monkeypatch):
    monkeypatch.setattr(ortinfo.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(ortinfo, "installed_dists", dict)
    s = ort_status()
    assert s.flavour == "not installed" and s.cuda_problem == "ONNX Runtime is not installed"
    assert "iap-rt[cpu]" in s.cuda_fix and "iap-rt[gpu]" in s.cuda_fix


def test_this_machine_has_the_cpu_wheel_and_the_session_check_runs():
    """The real check on the real (CPU) wheel: no CUDA provider, and opening the embedded
    model on the CUDA provider falls back to the CPU."""
    s = ort_status()
    assert s.dists == {"onnxruntime": s.version} and "CPUExecutionProvider" in s.providers
    assert ortinfo.cuda_start_problem() == "the session fell back to CPUExecutionProvider"
