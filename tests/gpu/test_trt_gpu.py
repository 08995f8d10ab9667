"""TensorRT backend on a real GPU (marker ``gpu``; skipped without CUDA): engines from the
embedded tiny model agree with ONNX Runtime, the CUDA-graph UNet step repeats exactly, a
dynamic profile serves two sizes, and every attention became one fused kernel."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from iap_rt import cuda as cudart
from iap_rt import enginedir as ed
from iap_rt.backends import trt as rt
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.specs import NETWORKS

pytestmark = pytest.mark.gpu

if not ed.installed_flavours():
    pytest.skip("no TensorRT installed", allow_module_level=True)

# what a fused multi-head-attention layer/kernel is called in TensorRT's engine inspector
FUSED_MHA = re.compile(r"mha|fmha|flash|attention", re.IGNORECASE)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if cudart.gpu_info() is None:
        pytest.skip("no CUDA GPU visible to TensorRT")
    from iap_rt.engines.api import build_engines
    from iap_rt.engines.config import EngineConfig

    dst = tmp_path_factory.mktemp("gpu") / "model"
    shutil.copytree(default_model_dir(), dst, ignore=shutil.ignore_patterns("engines"))
    build_engines(dst, EngineConfig(height=128, width=128, detailed_profile=True), echo=print)
    return ModelDir.open(dst)


def _feeds(md, net, values):
    return NETWORKS[net].dummy_inputs(md.dims, md.precision(net), values, seed=1, vocab_size=100)


def _ort(md, net, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(md.network_path(net)), providers=["CPUExecutionProvider"])
    return dict(zip(NETWORKS[net].output_names, sess.run(None, feeds)))


VALUES = {"text_encoder": {"N": 2}, "unet": {"N": 2, "h": 16, "w": 16},
          "vae_decoder": {"B": 1, "h": 16, "w": 16}}  # fmt: skip


def test_engines_match_onnx_runtime(model):
    backend = rt.TensorRTBackend()
    try:
        runners = backend.load(model)
        assert "cuda:0" in backend.device
        for net in NETWORKS:
            feeds = _feeds(model, net, VALUES[net])
            got, want = runners[net].run(feeds), _ort(model, net, feeds)
            for name in want:
                assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
                scale = float(np.abs(want[name]).max()) or 1.0
                err = float(np.abs(got[name].astype(np.float32) - want[name]).max()) / scale
                assert err < 2e-2, (net, name, err)  # TF32 / fp16 accumulation
    finally:
        backend.close()


def test_cuda_graph_unet_step_repeats_exactly(model):
    plain, graphed = rt.TensorRTBackend(cuda_graph=False), rt.TensorRTBackend(cuda_graph=True)
    try:
        u0, u1 = plain.load(model)["unet"], graphed.load(model)["unet"]
        for seed in range(3):  # first call captures, the next ones replay
            feeds = NETWORKS["unet"].dummy_inputs(model.dims, "fp32", VALUES["unet"], seed=seed)
            np.testing.assert_array_equal(u1.run(feeds)["noise_pred"], u0.run(feeds)["noise_pred"])
    finally:
        plain.close()
        graphed.close()


def test_dynamic_profile_serves_two_sizes_and_refuses_a_third(model, tmp_path):
    from iap_rt.engines.api import build_engines
    from iap_rt.engines.config import EngineConfig
    from iap_rt.errors import ArtifactMismatchError

    dst = tmp_path / "model"
    shutil.copytree(model.path, dst)
    build_engines(dst, EngineConfig(height=128, width=128, batch="1:2", resolution="64:192"),
                  echo=print)  # fmt: skip
    md = ModelDir.open(dst)
    backend = rt.TensorRTBackend()
    try:
        unet = backend.load(md)["unet"]
        for values in ({"N": 2, "h": 8, "w": 24}, {"N": 4, "h": 24, "w": 16}):
            feeds = _feeds(md, "unet", values)
            out = unet.run(feeds)["noise_pred"]
            ref = _ort(md, "unet", feeds)["noise_pred"]
            assert out.shape == ref.shape
            assert np.abs(out - ref).max() / np.abs(ref).max() < 2e-2
        with pytest.raises(ArtifactMismatchError, match="no unet engine covers"):
            unet.run(_feeds(md, "unet", {"N": 2, "h": 32, "w": 32}))
    finally:
        backend.close()


def test_each_attention_is_one_fused_kernel(model):
    """Every Softmax of the UNet ONNX (one per attention) must sit inside a fused MHA layer:
    no engine layer runs a softmax on its own."""
    import onnx

    n_attention = sum(
        n.op_type == "Softmax" for n in onnx.load(str(model.network_path("unet"))).graph.node
    )
    assert n_attention > 0
    backend = rt.TensorRTBackend()
    try:
        backend.load(model)
        trt = backend._trt
        unet = next(e for e in backend._engines if e.sidecar["network"] == "unet")
        inspector = unet.engine.create_engine_inspector()
        inspector.execution_context = unet.context
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    finally:
        backend.close()
    layers = [json.dumps(layer) for layer in info["Layers"]]
    assert all(not isinstance(layer, str) for layer in info["Layers"]), "build was not DETAILED"
    fused = [text for text in layers if FUSED_MHA.search(text)]
    lone_softmax = [
        text for text in layers if re.search(r"softmax", text, re.IGNORECASE)
        and not FUSED_MHA.search(text)
    ]  # fmt: skip
    assert not lone_softmax, f"{len(lone_softmax)} softmax layer(s) not fused:\n" + "\n".join(
        t[:300] for t in lone_softmax[:5]
    )
    assert len(fused) >= n_attention, (len(fused), n_attention)
