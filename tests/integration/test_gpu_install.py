"""The GPU install path in a fresh venv: the real onnxruntime-gpu wheel (it installs and
imports on a machine without a GPU; its CUDA provider just does not start) beside iap-rt,
and ``iap-rt info`` names it, its providers and why CUDA does not run here with the fix;
then the CPU wheel on top, the silent mess of two wheels sharing one module, which ``info``
names too. pip fetches the wheels through its cache; the GPU wheel is ~250 MB, so the test
is ``slow`` (IAP_RT_SLOW=1; about a minute once the wheel is cached).

The [cuda,cudnn] extras (GBs of nvidia-* wheels) are not installed here: the packaging of
the extras themselves is pinned by tests/unit/test_ortinfo.py."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ["numpy", "tokenizers", "pillow", "click", "tqdm", "flatbuffers", "packaging",
           "protobuf"]  # fmt: skip


def _run(cmd, cwd, **kw):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def test_gpu_wheel_in_a_fresh_venv_is_what_info_reports(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, *RUNTIME], tmp_path)
    _run([*pip, "--no-deps", "onnxruntime-gpu"], tmp_path)
    _run([*pip, "--no-deps", str(ROOT)], tmp_path)
    probe = "import onnxruntime as o; print(o.get_device(), ','.join(o.get_available_providers()))"
    device, providers = _run([py, "-c", probe], tmp_path).split()
    assert device == "GPU" and "CUDAExecutionProvider" in providers.split(",")

    info = _run([py, "-m", "iap_rt.cli", "info"], tmp_path).splitlines()
    ort_line = next(ln for ln in info if ln.startswith("onnxruntime: "))
    assert ort_line.startswith("onnxruntime: onnxruntime-gpu 1.")
    assert "CUDAExecutionProvider" in ort_line and " + " not in ort_line
    i = info.index(next(ln for ln in info if ln.startswith("CUDA: ")))
    assert info[i].startswith("CUDA: not usable: the CUDA provider ")  # no GPU/driver here
    assert info[i + 1].startswith("  fix: ")

    _run([*pip, "--no-deps", "onnxruntime"], tmp_path)  # the CPU wheel on top: a mess
    info = _run([py, "-m", "iap_rt.cli", "info"], tmp_path)
    assert "onnxruntime-gpu 1." in info and " + " in info.splitlines()[1]
    assert "onnxruntime and onnxruntime-gpu are both installed in one place" in info
    assert "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'iap-rt[gpu]'" in info
