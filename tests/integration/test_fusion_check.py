"""The fused-attention check counts fused kernels only: a graph whose attention cannot fuse
fails it, although every one of its layers carries diffusers' ``attentions`` in its ONNX
names. Real TensorRT-RTX builds (no GPU needed: the builder logs its layer dump)."""

from __future__ import annotations

import pytest

from iap_rt.engines.build import (
    Layer,
    check_fusion,
    fused_softmaxes,
    fusion_report,
    inspector_layers,
    log_layers,
)
from iap_rt.errors import EngineBuildError

trt = pytest.importorskip("tensorrt_rtx")


def _report(path):
    return fused_softmaxes(trt, path, lambda name, shape: shape)


def test_fp16_attention_with_an_sd_head_passes(attention_onnx):
    report = _report(attention_onnx("fused"))
    assert report.engine_bytes and len(report.softmax) == 1
    assert report.fused == report.softmax and report.problems() == []
    check_fusion(report, "fused.onnx")  # does not raise


@pytest.mark.parametrize("dtype, head", [("fp32", 32), ("fp16", 4)])
def test_attention_that_cannot_fuse_fails_the_check(attention_onnx, dtype, head):
    path = attention_onnx(f"unfused_{dtype}_{head}", dtype=dtype, head=head)
    report = _report(path)
    assert report.engine_bytes and len(report.softmax) == 1 and report.fused == []
    with pytest.raises(EngineBuildError, match="1 of 1 attention Softmax nodes are not inside"):
        check_fusion(report, path.name)


def test_layer_names_not_onnx_names_decide_what_is_fused(attention_onnx):
    """The unfused engine's layers all come from ``.../attentions.0/...`` nodes (a regex on
    the whole layer text, as the old check had, calls them fused); only a fused kernel's own
    name counts."""
    log: list[str] = []
    from iap_rt.engines import build

    real = build._logger
    build._logger = lambda t, sink, verbose=None: real(t, sink, log)
    try:
        fused_softmaxes(trt, attention_onnx("plain", dtype="fp32"), lambda n, s: s)
    finally:
        build._logger = real
    layers = log_layers(log)
    assert layers and all("attentions.0" in " ".join(ly.onnx_nodes) for ly in layers)
    assert not any(ly.fused_attention for ly in layers)
    softmax = "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/Softmax"
    assert any(softmax in ly.onnx_nodes for ly in layers)  # it is there, as its own kernel
    assert fusion_report(layers, [softmax]).problems()


def test_inspector_json_is_read_the_same_way():
    """The GPU test reads the engine inspector's JSON: same rule, same answer."""
    info = {
        "Layers": [
            {"Name": "/down_blocks.0/attentions.0/proj_in", "Metadata": "[ONNX Layer: /a/MatMul]"},
            {"Name": "__myl_MulMaxrSubExpSumDivMul_myl0_2",
             "Metadata": "[ONNX Layer: /a/Softmax]\x1e[ONNX Layer: /a/Mul]"},
            {"Name": "_gemm_mha_v2_myl3_5", "Metadata": "[ONNX Layer: /b/Softmax]"},
        ]
    }  # fmt: skip
    layers = inspector_layers(info)
    assert [ly.fused_attention for ly in layers] == [False, False, True]
    report = fusion_report(layers, ["/a/Softmax", "/b/Softmax"])
    assert report.fused == ["/b/Softmax"] and "1 of 2" in report.problems()[0]
    assert fusion_report([Layer("_gemm_mha_v1", ())], []).problems()  # no attention: not a pass
