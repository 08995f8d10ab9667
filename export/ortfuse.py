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
written as a separate file (``unet.ort.onnx``, see :func:`write_ort_variant`;
the ``ort`` backend prefers it on CPU and CUDA; the CUDA provider runs MultiHeadAttention with
its flash / memory-efficient kernels, fp16 included). Only the graph is rewritten: a model whose weights live in
external data keeps pointing at the same data file, so the rewritten file must sit beside
the original. Measured on SD 1.5 (``bench/ort_cpu_mha.py``): see ``bench/README.md``.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

from iap_rt.errors import ArtifactMismatchError
from iap_rt.export.config import ExportConfig
from iap_rt.fileio import sha256_file
from iap_rt.modeldir import ORT_UNET_FILE, ORT_VARIANT, drop_legacy_variant_keys
from iap_rt.specs import UNET, ModelDims, NetworkSpec


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


# ---- the UNet's ONNX Runtime variant in a model directory ------------------------------------------
# max |variant - unet.onnx| allowed, relative to max(1, max |output|), per precision
ORT_VARIANT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


def wants_ort_variant(cfg: ExportConfig, entry: dict) -> bool:
    """UNets with fusable attention; ``auto`` only when the weights are external (big models,
    where the unfused scores cost GBs; small models would duplicate their weights)."""
    if cfg.ort_unet == "never":
        return False
    if not entry.get("attention", {}).get("fusable"):
        return False
    return cfg.ort_unet == "always" or "external_data" in entry


def ort_variant_settled(previous: dict, cfg: ExportConfig) -> bool:
    unet = previous.get("networks", {}).get("unet")
    return unet is None or wants_ort_variant(cfg, unet) == (ORT_VARIANT in unet)


def write_ort_variant(
    stage: Path, entry: dict, cfg: ExportConfig, dims: ModelDims, echo, spec: NetworkSpec = UNET
) -> None:
    """Write, keep or drop ``unet.ort.onnx`` in ``stage`` and ``entry["ort"]``.

    The variant is derived from ``unet.onnx`` alone (:func:`fuse_attention_for_ort`: the same
    graph with ONNX Runtime's fused MultiHeadAttention; same weights file), so it is checked
    against ``unet.onnx`` in ONNX Runtime, not against PyTorch."""
    path = stage / ORT_UNET_FILE
    if not wants_ort_variant(cfg, entry):
        path.unlink(missing_ok=True)
        entry.pop(ORT_VARIANT, None)
        return
    old = entry.get(ORT_VARIANT)
    if old and old.get("unet_sha256") == entry["sha256"] and path.is_file():
        if path.stat().st_size == old.get("bytes"):
            return  # carried over with its UNet
    t0 = time.perf_counter()
    drop_legacy_variant_keys(entry, ORT_VARIANT)
    fused = fuse_attention_for_ort(stage / entry["file"], path)
    precision = entry["precision"]
    diff, scale = _compare_in_ort(stage / entry["file"], path, dims, precision, spec)
    if diff > ORT_VARIANT_TOLERANCE[precision] * max(1.0, scale):
        path.unlink(missing_ok=True)
        raise ArtifactMismatchError(
            f"{ORT_UNET_FILE} differs from {entry['file']} by {diff:.3g} (outputs up to "
            f"{scale:.3g}) in ONNX Runtime",
            fix="export with --ort-unet never and report the model.",
        )
    entry[ORT_VARIANT] = {
        "file": ORT_UNET_FILE,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "unet_sha256": entry["sha256"],
        "attention_fused": fused,
        "max_abs_diff": diff,
        "s": round(time.perf_counter() - t0, 2),
    }
    echo(f"unet: {ORT_UNET_FILE} with {fused} fused attentions (max diff {diff:.2g})")


def _compare_in_ort(
    a: Path, b: Path, dims: ModelDims, precision: str, spec: NetworkSpec
) -> tuple[float, float]:
    """Max |a - b| of the two UNet graphs on the contract's seeded dummy input (CPU, the
    validation session), and max |a|."""
    import numpy as np

    from iap_rt.export.exporter import ort_session

    side = 2 * dims.latent_multiple  # the smallest size every level can take
    feed = spec.dummy_inputs(dims, precision, {"N": 2, "h": side, "w": side})
    outs = []
    for path in (a, b):
        sess = ort_session(path)
        outs.append(sess.run(None, feed)[0].astype(np.float32))
        del sess
    return float(np.abs(outs[0] - outs[1]).max()), float(np.abs(outs[0]).max())
