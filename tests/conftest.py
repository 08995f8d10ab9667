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
        skip_slow = pytest.mark.skip(
            reason="slow test (real size, or minutes): IAP_RT_SLOW=1 runs it"
        )
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(skip_slow)
    if any(item.get_closest_marker("gpu") for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture
def attention_onnx(tmp_path):
    """``make(name, dtype="fp16", head=32, seq=64) -> Path``: one self-attention, MatMul ->
    Mul -> Softmax -> MatMul, its nodes named as diffusers names them
    (``/down_blocks.0/attentions.0/transformer_blocks.0/attn1/...``). fp16 with an SD-sized
    head is what TensorRT fuses into one kernel; fp32 or a 4-wide head cannot fuse."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    def make(name: str, dtype: str = "fp16", head: int = 32, seq: int = 64):
        elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
        np_dtype = np.float16 if dtype == "fp16" else np.float32
        p = "/down_blocks.0/attentions.0/transformer_blocks.0/attn1"
        nodes = [
            helper.make_node("Transpose", ["x"], ["kt"], perm=[0, 2, 1], name=f"{p}/Transpose"),
            helper.make_node("MatMul", ["x", "kt"], ["scores"], name=f"{p}/MatMul"),
            helper.make_node("Mul", ["scores", "scale"], ["scaled"], name=f"{p}/Mul"),
            helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name=f"{p}/Softmax"),
            helper.make_node("MatMul", ["probs", "x"], ["y"], name=f"{p}/MatMul_1"),
        ]
        graph = helper.make_graph(
            nodes,
            "attention",
            [helper.make_tensor_value_info("x", elem, [2, seq, head])],
            [helper.make_tensor_value_info("y", elem, [2, seq, head])],
            [numpy_helper.from_array(np.array(head**-0.5, np_dtype), "scale")],
        )
        path = tmp_path / f"{name}.onnx"
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        return path

    return make
