"""The attention-pattern walker and axis naming on hand-built ONNX graphs (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from iap_rt.export.graph import find_attentions, name_axes  # noqa: E402
from iap_rt.specs import VAE_DECODER  # noqa: E402

F = TensorProto.FLOAT


def _attention_graph(middle: list[str], scale_op: str = "Mul"):
    """q, k, v -> MatMul(q, kT) -> <middle ops> -> Softmax -> MatMul(., v)."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.125, np.float32), "scale"),
        numpy_helper.from_array(np.zeros((1, 1, 1, 6), np.float32), "mask"),
        numpy_helper.from_array(np.ones((2, 2, 4, 8), np.float32), "bias"),
    ]
    cur = "s0"
    for i, op in enumerate(middle):
        out = f"m{i}"
        if op == "scale":
            nodes.append(helper.make_node(scale_op, [cur, "scale"], [out]))
        elif op == "mask":
            nodes.append(helper.make_node("Add", [cur, "mask"], [out]))
        elif op == "bias":  # a full-size tensor, not a scalar
            nodes.append(helper.make_node("Mul", [cur, "bias"], [out]))
        elif op == "Cast":
            nodes.append(helper.make_node("Cast", [cur], [out], to=F))
        cur = out
    nodes += [
        helper.make_node("Softmax", [cur], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    shape = [2, 2, 4, 8]
    graph = helper.make_graph(
        nodes,
        "attn",
        [
            helper.make_tensor_value_info("q", F, shape),
            helper.make_tensor_value_info("k", F, [2, 2, 6, 8]),
            helper.make_tensor_value_info("v", F, [2, 2, 6, 8]),
        ],
        [helper.make_tensor_value_info("o", F, shape)],
        initializer=inits,
    )
    return graph


@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
def test_matmul_scale_softmax_matmul_is_fusable(scale_op):
    (m,) = find_attentions(_attention_graph(["scale"], scale_op))
    assert m.fusable, m.problem
    assert m.chain == ("MatMul", scale_op, "Softmax", "MatMul")


def test_mask_add_is_fusable_only_where_a_mask_belongs():
    graph = _attention_graph(["scale", "mask"])
    (m,) = find_attentions(graph, allow_mask=True)
    assert m.fusable and m.chain == ("MatMul", "Mul", "Add", "Softmax", "MatMul")
    (m,) = find_attentions(graph)  # UNet/VAE: an Add there is baddbmm's + 0*empty
    assert not m.fusable and "Add" in m.problem


@pytest.mark.parametrize(
    "middle, culprit",
    [(["Cast", "scale"], "Cast"), (["scale", "Cast"], "Cast"), (["bias"], "constant scalar")],
)
def test_anything_else_between_the_nodes_blocks_fusion(middle, culprit):
    (m,) = find_attentions(_attention_graph(middle))
    assert not m.fusable
    assert culprit in m.problem


@pytest.mark.parametrize("escape", ["node", "graph output"])
def test_a_tensor_escaping_the_chain_blocks_fusion(escape):
    graph = _attention_graph(["scale"])
    if escape == "node":
        graph.node.append(helper.make_node("Identity", ["s0"], ["s0_copy"]))
    else:
        graph.output.append(helper.make_tensor_value_info("s0", F, None))
    (m,) = find_attentions(graph)
    assert not m.fusable and "2 consumers" in m.problem


def test_softmax_not_followed_by_one_matmul_is_reported():
    graph = _attention_graph(["scale"])
    graph.node.append(helper.make_node("Identity", ["p"], ["p2"]))
    (m,) = find_attentions(graph)
    assert not m.fusable and "not one MatMul" in m.problem


def test_name_axes_renames_exporter_symbols_everywhere():
    x = helper.make_tensor_value_info("latent_sample", F, ["s68", 4, "s59", "s38"])
    y = helper.make_tensor_value_info("image", F, ["s68", 3, "8*s59", "8*s38"])
    mid = helper.make_tensor_value_info("t", F, ["s68", 4, "2*s59", "s38*s59"])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["latent_sample"], ["image"])],
        "g",
        [x],
        [y],
        value_info=[mid],
    )
    model = helper.make_model(graph)
    mapping = name_axes(model, VAE_DECODER)
    assert mapping == {"s68": "B", "s59": "h", "s38": "w"}
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == ["B", 4, "h", "w"]
    assert dims(model.graph.output[0]) == ["B", 3, "H", "W"]
    assert dims(model.graph.value_info[0]) == ["B", 4, "2*h", "w*h"]
