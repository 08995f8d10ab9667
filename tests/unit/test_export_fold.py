"""Constant folding after the dynamo export (export/graph.cleanup) works on a graph whose big
weights are external, from any working directory; a folding failure is a warning that names
the network and what it costs, never a silent skip (issue 31.3)."""

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_graphsurgeon")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from iap_rt.export.graph import SMALL_TENSOR, cleanup, load_small_tensors  # noqa: E402


def _model_with_external_weight(directory):
    """y = x + sum(W): W (2 MB, external data) is folded to a scalar by ReduceSum."""
    w = np.arange(SMALL_TENSOR // 2, dtype=np.float32).reshape(-1, 1024) / 1e6  # 2 MB
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["W"], ["s"], keepdims=0),
         helper.make_node("Add", ["x", "s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = directory / ".net.raw.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=".net.raw.onnx.data", size_threshold=0)  # fmt: skip
    return path, float(w.sum(dtype=np.float32))


def test_folding_reads_external_weights_from_another_working_directory(tmp_path, monkeypatch,
                                                                       caplog):  # fmt: skip
    (tmp_path / "model").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path, total = _model_with_external_weight(tmp_path / "model")
    monkeypatch.chdir(tmp_path / "elsewhere")  # as `iap-rt export --out model` run from here
    model = onnx.load(str(path), load_external_data=False)
    load_small_tensors(model, path.parent)
    with caplog.at_level(logging.WARNING):
        out, folded = cleanup(model, path.parent, "net")
    assert folded and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [n.op_type for n in out.graph.node] == ["Add"]  # ReduceSum(W) became a constant
    s = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "s")
    assert np.isclose(float(s), total, rtol=1e-5)
    assert str(tmp_path / "elsewhere") == str(__import__("os").getcwd())  # restored


def test_a_failed_fold_is_a_named_warning_and_the_graph_is_kept(tmp_path, caplog):
    path, _ = _model_with_external_weight(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    (tmp_path / ".net.raw.onnx.data").unlink()  # the data file is gone: folding cannot run
    with caplog.at_level(logging.WARNING, logger="iap_rt.export"):
        out, folded = cleanup(model, tmp_path, "text_encoder")
    assert not folded
    msg = " ".join(r.getMessage() for r in caplog.records if r.name == "iap_rt.export")
    assert "constant folding of text_encoder failed" in msg and "unfolded" in msg
    assert [n.op_type for n in out.graph.node] == ["ReduceSum", "Add"]
