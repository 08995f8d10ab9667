"""Rewrite the exported attention into ONNX Runtime's fused ``MultiHeadAttention``.

The export writes every attention as ``MatMul(q, kT) -> Mul(scale) -> Softmax -> MatMul(v)``
with the head split/merge as Reshape/Transpose around it: the form TensorRT fuses into one
MHA kernel (see :mod:`iap_rt.export.attention`). ONNX Runtime's CPU provider runs that form
op by op and materialises every (batch, heads, tokens, tokens) score tensor: at SD 1.5's
64x64 level that is 2 x 8 x 4096 x 4096 floats, 1 GiB per tensor. ONNX Runtime's own
transformer optimizer does not recognise dynamo-exported graphs, so this module matches the
pattern itself and replaces it with ``com.microsoft.MultiHeadAttention(q, k, v)`` (the
projections' outputs before the head split; ``num_heads`` from the Reshape's shape,
``scale`` from the Mul), keeping the output name so the rest of the graph is untouched.

The result is an ONNX Runtime-only graph (TensorRT cannot parse the contrib op), so it is
written as a separate file (``unet.ort.onnx``, see :func:`iap_rt.export.modeldir.ort_variant`;
the ``ort`` backend prefers it on CPU and CUDA; the CUDA provider runs MultiHeadAttention with
its flash / memory-efficient kernels, fp16 included). Only the graph is rewritten: a model whose weights live in
external data keeps pointing at the same data file, so the rewritten file must sit beside
the original. Measured on SD 1.5 (``bench/ort_cpu_mha.py``): see ``bench/README.md``.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from iap_rt.errors import ArtifactMismatchError


def fuse_attention_for_ort(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Write ``dst``: ``src`` with every exported attention as MultiHeadAttention; -> count.

    ``dst`` must be in the same directory as ``src`` when ``src`` uses external data. Raises
    :class:`ArtifactMismatchError` when a Softmax is not in the exported attention pattern.
    """
    import onnx
    from onnx import helper, numpy_helper

    src, dst = Path(src), Path(dst)
    if src.resolve().parent != dst.resolve().parent:
        raise ValueError(f"{dst} must be beside {src} (external data paths are relative)")
    m = onnx.load(str(src), load_external_data=False)
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    values = {i.name: i for i in g.initializer if not i.external_data}
    values.update(
        {n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute}
    )

    def const(name: str):
        t = values.get(name)
        return None if t is None else numpy_helper.to_array(t)

    replace = {}
    for sm in (n for n in g.node if n.op_type == "Softmax"):
        try:
            mul = prod[sm.input[0]]
            scores = prod[mul.input[0]]
            q_t, k_t = prod[scores.input[0]], prod[scores.input[1]]
            (pv,) = cons[sm.output[0]]
            v_t = prod[pv.input[1]]
            (o_t,) = cons[pv.output[0]]
            (o_r,) = cons[o_t.output[0]]
            q_r, k_r, v_r = prod[q_t.input[0]], prod[k_t.input[0]], prod[v_t.input[0]]
            heads = int(const(prod[q_r.input[1]].input[2]).reshape(-1)[0])
            scale = float(const(mul.input[1]).reshape(-1)[0])
        except (KeyError, ValueError, AttributeError, TypeError, IndexError) as e:
            raise ArtifactMismatchError(
                f"{src}: Softmax {sm.name!r} is not in the exported attention pattern ({e!r})",
                fix="rewrite only UNets exported by `iap-rt export` (fusable attention).",
            ) from e
        ops = [n.op_type for n in (mul, scores, q_t, k_t, pv, v_t, o_t, o_r, q_r, k_r, v_r)]
        if ops != ["Mul", "MatMul", "Transpose", "Transpose", "MatMul", "Transpose",
                   "Transpose", "Reshape", "Reshape", "Reshape", "Reshape"]:  # fmt: skip
            raise ArtifactMismatchError(
                f"{src}: Softmax {sm.name!r} is not in the exported attention pattern ({ops})",
                fix="rewrite only UNets exported by `iap-rt export` (fusable attention).",
            )
        replace[id(o_r)] = helper.make_node(
            "MultiHeadAttention",
            [q_r.input[0], k_r.input[0], v_r.input[0]],
            [o_r.output[0]],
            name=f"mha_{len(replace)}",
            domain="com.microsoft",
            num_heads=heads,
            scale=scale,
        )
    nodes = [replace.get(id(n), n) for n in g.node]
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(nodes):  # drop what only fed the replaced attention
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    live.reverse()
    used = {i for n in live for i in n.input}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(live)
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, dst)
    return len(replace)
