"""ONNX Runtime CPU attention rewrite: same outputs, fused MultiHeadAttention, external data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from iap_rt.errors import ArtifactMismatchError  # noqa: E402
from iap_rt.export.exporter import ort_session  # noqa: E402
from iap_rt.export.ortfuse import fuse_attention_for_ort  # noqa: E402
from iap_rt.modeldir import ModelDir, default_model_dir  # noqa: E402
from iap_rt.specs import NETWORKS  # noqa: E402


def _run(path, feed):
    return ort_session(path).run(None, feed)[0]


def _feed(md, side):
    return NETWORKS["unet"].dummy_inputs(md.dims, "fp32", {"N": 2, "h": side, "w": side})


@pytest.mark.parametrize("external", [False, True])
def test_rewrite_fuses_every_attention_and_keeps_outputs(tmp_path, external):
    md = ModelDir.open(default_model_dir())
    src = tmp_path / "unet.onnx"
    if external:  # weights in a .data file, like SD 1.5: the rewrite must keep pointing at it
        m = onnx.load(str(md.path / "unet.onnx"))
        onnx.save(m, str(src), save_as_external_data=True, location="unet.onnx.data")
    else:
        shutil.copy(md.path / "unet.onnx", src)
    softmaxes = sum(n.op_type == "Softmax" for n in onnx.load(str(src)).graph.node)
    dst = tmp_path / "unet.ort.onnx"
    assert fuse_attention_for_ort(src, dst) == softmaxes > 0
    g = onnx.load(str(dst)).graph
    assert not any(n.op_type == "Softmax" for n in g.node)
    assert sum(n.op_type == "MultiHeadAttention" for n in g.node) == softmaxes
    if external:
        assert dst.stat().st_size < 0.1 * (tmp_path / "unet.onnx.data").stat().st_size
    for side in (32, 48):  # dynamic latent size still works
        feed = _feed(md, side)
        np.testing.assert_allclose(_run(dst, feed), _run(src, feed), atol=1e-4)


def test_a_softmax_outside_the_attention_pattern_is_refused(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(src))
    with pytest.raises(ArtifactMismatchError, match="not in the exported attention pattern"):
        fuse_attention_for_ort(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
