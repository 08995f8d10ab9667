"""Shared test settings: serial, few threads (tiny tests slow 50x under CPU contention)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


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
