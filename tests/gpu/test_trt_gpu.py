"""TensorRT backend on a real GPU (marker ``gpu``; skipped without CUDA): engines from the
embedded tiny model agree with ONNX Runtime, the CUDA-graph UNet step matches the plain context,
a dynamic profile serves two sizes, and an fp16 attention became one fused kernel.

Every size comes from the model's own dims (the embedded toy model has a VAE factor of 1,
latents in multiples of 16 and 32-pixel images), never from SD's factor of 8.
"""

from __future__ import annotations

import json
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


def _usable_flavour() -> str:
    gpu = cudart.gpu_info()
    if gpu is None:
        pytest.skip(f"no CUDA GPU for TensorRT: {cudart.no_gpu_reason()}")
    for flavour in ed.installed_flavours():
        if ed.unsupported_gpu_reason(flavour, ed.import_trt(flavour), gpu) is None:
            return flavour
    pytest.skip(f"no installed TensorRT runs on {gpu.name} ({gpu.cc_str})")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    flavour = _usable_flavour()
    from iap_rt.engines.config import EngineConfig
    from iap_rt.engines.stage import build_engines

    dst = tmp_path_factory.mktemp("gpu") / "model"
    shutil.copytree(default_model_dir(), dst, ignore=shutil.ignore_patterns("engines"))
    # static engines at the model's native size (image_size from the manifest)
    build_engines(dst, EngineConfig(flavour=flavour, detailed_profile=True), echo=print)
    return ModelDir.open(dst)


def latent_side(md: ModelDir) -> int:
    """The latent side of the model's native image size."""
    side = int(md.manifest["image_size"]) // md.dims.vae_scale_factor
    assert side % md.dims.latent_multiple == 0
    return side


def values(md: ModelDir) -> dict[str, dict[str, int]]:
    """Per network, the axis values the static engines (the model's native size) serve."""
    h = latent_side(md)
    return {"text_encoder": {"N": 2}, "unet": {"N": 2, "h": h, "w": h},
            "vae_decoder": {"B": 1, "h": h, "w": h}}  # fmt: skip


def dynamic_case(md: ModelDir) -> tuple[dict, list[dict[str, int]], dict[str, int]]:
    """(EngineConfig options of a dynamic profile, two UNet requests it serves, one it
    refuses): batch 1-2 under guidance, sides from one pixel multiple to twice the native
    size."""
    size, px = int(md.manifest["image_size"]), md.dims.pixel_multiple
    m, f = md.dims.latent_multiple, md.dims.vae_scale_factor
    lo, hi = px // f, 2 * size // f  # the latent range the profile covers
    options = {"batch": "1:2", "resolution": f"{px}:{2 * size}"}
    served = [{"N": 2, "h": lo, "w": hi}, {"N": 4, "h": hi, "w": lo + m}]
    return options, served, {"N": 2, "h": hi + m, "w": hi + m}


def _feeds(md, net, vals, seed=1):
    return NETWORKS[net].dummy_inputs(md.dims, md.precision(net), vals, seed=seed, vocab_size=100)


def _ort(md, net, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(md.network_path(net)), providers=["CPUExecutionProvider"])
    return dict(zip(NETWORKS[net].output_names, sess.run(None, feeds)))


def test_engines_match_onnx_runtime(model):
    backend = rt.TensorRTBackend(kernel_specialization="eager")
    try:
        runners = backend.load(model)
        assert "cuda:0" in backend.device
        for net, vals in values(model).items():
            feeds = _feeds(model, net, vals)
            got, want = runners[net].run(feeds), _ort(model, net, feeds)
            for name in want:
                assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
                scale = float(np.abs(want[name]).max()) or 1.0
                err = float(np.abs(got[name].astype(np.float32) - want[name]).max()) / scale
                assert err < 2e-2, (net, name, err)  # TF32 / fp16 accumulation
    finally:
        backend.close()


def test_cuda_graph_unet_step_matches_the_plain_context(model):
    """The captured UNet step (first call captures, the next ones replay) computes what the
    plain context does. Two contexts are not bit-exact by contract (TensorRT may pick
    kernels that reduce in another order per context), so the bar is a relative one."""
    plain = rt.TensorRTBackend(cuda_graph=False, kernel_specialization="eager")
    graphed = rt.TensorRTBackend(cuda_graph=True, kernel_specialization="eager")
    try:
        u0, u1 = plain.load(model)["unet"], graphed.load(model)["unet"]
        for seed in range(3):
            feeds = _feeds(model, "unet", values(model)["unet"], seed=seed)
            want = u0.run(feeds)["noise_pred"].astype(np.float32)
            got = u1.run(feeds)["noise_pred"].astype(np.float32)
            scale = float(np.abs(want).max()) or 1.0
            assert float(np.abs(got - want).max()) / scale < 1e-3, seed
    finally:
        plain.close()
        graphed.close()


def test_dynamic_profile_serves_two_sizes_and_refuses_a_third(model, tmp_path):
    from iap_rt.engines.config import EngineConfig
    from iap_rt.engines.stage import build_engines
    from iap_rt.errors import ArtifactMismatchError

    dst = tmp_path / "model"
    shutil.copytree(model.path, dst)
    md = ModelDir.open(dst)
    options, served, refused = dynamic_case(md)
    build_engines(dst, EngineConfig(flavour=_usable_flavour(), **options), echo=print)
    backend = rt.TensorRTBackend(kernel_specialization="eager")
    try:
        unet = backend.load(md)["unet"]
        for vals in served:
            feeds = _feeds(md, "unet", vals)
            out = unet.run(feeds)["noise_pred"]
            ref = _ort(md, "unet", feeds)["noise_pred"]
            assert out.shape == ref.shape
            assert np.abs(out - ref).max() / np.abs(ref).max() < 2e-2
        with pytest.raises(ArtifactMismatchError, match="no unet engine covers"):
            unet.run(_feeds(md, "unet", refused))
    finally:
        backend.close()


def test_fp16_attention_is_one_fused_kernel_on_this_gpu(attention_onnx):
    """The engine inspector of an engine built and loaded on this GPU names a fused MHA kernel
    whose source is the attention's Softmax; the check would fail for an unfused engine
    (tests/integration/test_fusion_check.py)."""
    from iap_rt.engines.build import check_fusion, fusion_report, inspector_layers, softmax_nodes

    trt = ed.import_trt(_usable_flavour())
    path = attention_onnx("attention")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    assert trt.OnnxParser(network, logger).parse_from_file(str(path))
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    plan = builder.build_serialized_network(network, config)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = inspector_layers(info)
    # a DETAILED build names the ONNX nodes of the layers that came from them; the layers
    # TensorRT adds itself (reformats, copies) carry none, so not every layer has them
    assert any(ly.onnx_nodes for ly in layers), "build was not DETAILED"
    check_fusion(fusion_report(layers, softmax_nodes(path)), path.name)
