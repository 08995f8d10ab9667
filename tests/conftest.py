"""Shared test settings: serial, few threads (tiny tests slow 50x under CPU contention)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Verification records (iap_rt.modeldir) go to a per-run directory, not ~/.cache."""
    if "IAP_RT_CACHE_DIR" not in os.environ:
        import tempfile

        config._iap_rt_cache = tempfile.mkdtemp(prefix="iap-rt-test-cache-")
        os.environ["IAP_RT_CACHE_DIR"] = config._iap_rt_cache


def pytest_unconfigure(config):
    cache = getattr(config, "_iap_rt_cache", None)
    if cache:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("IAP_RT_CACHE_DIR", None)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        pass
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if os.environ.get("IAP_RT_SLOW") != "1":
        skip_slow = pytest.mark.skip(reason="real-size test: set IAP_RT_SLOW=1 to run")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(skip_slow)
    if any(item.get_closest_marker("gpu") for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
