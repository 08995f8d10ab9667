"""ONNX graph work after the dynamo exporter (no torch here): cleanup, axis names, saving with
external data past 512 MiB, and the attention-pattern check.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iap_rt.errors import OutputError
from iap_rt.specs import NetworkSpec

LOG = logging.getLogger("iap_rt.export")

# Weights past this go to one external ``<name>.onnx.data`` file: protobuf cannot serialize a
# message over 2 GiB, and the UNet's ONNX Runtime variant (``unet.ort.onnx``, graph only)
# shares that file instead of a second copy of the weights. 512 MiB: the SD 1.5 UNet in fp32
# (3.4 GB) and fp16 (1.7 GB) go out; its text encoder (0.4 GB) and VAE decoder stay one file.
EXTERNAL_DATA_THRESHOLD = 512 * 2**20
SMALL_TENSOR = 1 << 20  # initializers loaded for constant folding; bigger ones stay on disk
SCALE_OPS = ("Mul", "Div")


# ---- cleanup and saving -------------------------------------------------------------------------


def initializer_bytes(model) -> int:
    """Bytes of all initializers of an ``onnx.ModelProto`` (loaded or external)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else int(np.prod(t.dims)) * _itemsize(t.data_type)
    return total


def _itemsize(data_type: int) -> int:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def load_small_tensors(model, base_dir: str | os.PathLike, limit: int = SMALL_TENSOR) -> dict:
    """Load the external initializers up to ``limit`` bytes (shape constants, scalars) into
    ``model``; the weights stay on disk. Returns ``{name: external_data entries}`` of the
    loaded ones, for :func:`restore_external`."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    loaded = {}
    for t in model.graph.initializer:
        if uses_external_data(t) and int(np.prod(t.dims)) * _itemsize(t.data_type) <= limit:
            loaded[t.name] = [(e.key, e.value) for e in t.external_data]
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return loaded


def restore_external(model, loaded: dict) -> None:
    """Point the initializers :func:`load_small_tensors` loaded back at their bytes in the
    external file (they are still there), instead of keeping a second copy in the graph."""
    import onnx

    for t in model.graph.initializer:
        entries = loaded.get(t.name)
        if entries is None or str(len(t.raw_data)) != dict(entries).get("length"):
            continue
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in entries:
            t.external_data.add(key=key, value=value)


def cleanup(model, base_dir: str | os.PathLike, name: str = "graph"):
    """Constant folding, dead-node removal and topological sort (onnx-graphsurgeon); returns
    (model, folded): ``folded`` False when folding failed (logged as a warning naming the
    network and what it costs; the graph is then kept unfolded, which computes the same).

    Works on a graph whose weights are still external (see :func:`load_small_tensors`):
    folded results past ``SMALL_TENSOR`` are not materialised (an Expand of a scalar must not
    become megabytes of weights). onnx-graphsurgeon evaluates the foldable subgraph in ONNX
    Runtime from *bytes*, and ONNX Runtime resolves the external data of a model loaded from
    bytes against the working directory: folding runs with ``base_dir`` (where the data file
    is) as the working directory, or every export run from elsewhere silently skipped it.
    """
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    folded = True
    with working_directory(base_dir):
        try:
            graph.fold_constants(size_threshold=SMALL_TENSOR, error_ok=False)
        except Exception as e:  # noqa: BLE001 - folding is an optimisation: say so, go on
            folded = False
            LOG.warning("export: constant folding of %s failed, so its graph is saved unfolded "
                        "(it computes the same; ONNX Runtime and TensorRT fold it when they load "
                        "it, a slower first load): %s", name, str(e).splitlines()[0][:300])  # fmt: skip
            graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False)
    graph.toposort()
    return gs.export_onnx(graph), folded


@contextlib.contextmanager
def working_directory(path: str | os.PathLike):
    """``os.chdir(path)`` for the block (the export is single-threaded)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def name_axes(model, spec: NetworkSpec) -> dict[str, str]:
    """Rename the exporter's dim symbols (``s20``, ``8*s59``) to the spec's axis symbols.

    Input symbols are mapped from the spec's declaration and renamed everywhere they occur
    (inside value_info expressions too); graph outputs get the spec's symbols outright.
    Returns the mapping used.
    """
    decl = {t.name: t.axes for t in spec.tensors()}
    dyn = spec.dynamic_axes()
    mapping: dict[str, str] = {}
    for vi in model.graph.input:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if i in dyn.get(vi.name, {}) and d.dim_param:
                mapping.setdefault(d.dim_param, decl[vi.name][i])
    if mapping:
        pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in mapping) + r")\b")
        for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = pattern.sub(lambda m: mapping[m.group(1)], d.dim_param)
    for vi in model.graph.output:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if i in dyn.get(vi.name, {}):
                d.dim_param = decl[vi.name][i]
    return mapping


def save_model(model, path: str | os.PathLike, data_file: Path | None = None) -> list[Path]:
    """Save ``model`` to ``path``; return the files written.

    ``data_file``: the model's initializers are external, in this file (not loaded): it is
    moved to ``<name>.data`` beside ``path`` and the graph points at it (for models past
    ``EXTERNAL_DATA_THRESHOLD``). Otherwise everything is in memory and goes into one file.
    ``OSError`` (a full disk, say) becomes :class:`OutputError`.
    """
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    files = [path]
    try:
        if data_file is not None:
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    for entry in t.external_data:
                        if entry.key == "location":
                            entry.value = data.name
            os.replace(data_file, data)
            files.append(data)
        onnx.save(model, str(path))
    except OSError as e:
        for f in files:
            f.unlink(missing_ok=True)
        raise _write_error(path, e) from e
    return files


def infer_shapes(path: str | os.PathLike) -> None:
    """ONNX shape inference on the saved file, in place (path-based: any size, and the caller
    can drop its in-memory copy first)."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except OSError as e:
        raise _write_error(Path(path), e) from e


def _write_error(path: Path, e: OSError) -> OutputError:
    hint = " (no space left on device)" if e.errno == errno.ENOSPC else ""
    return OutputError(
        f"cannot write {path}{hint}: {e.strerror or e}",
        fix="free disk space or choose another --out; the previous model directory is untouched.",
    )


# ---- the attention-pattern check ----------------------------------------------------------------


@dataclass(frozen=True)
class AttentionMatch:
    """One ``Softmax`` of a graph and whether the nodes around it form the fusable pattern."""

    softmax: str
    chain: tuple[str, ...]  # op types from the first MatMul to the second, e.g. MatMul Mul Softmax
    problem: str | None  # None when fusable

    @property
    def fusable(self) -> bool:
        return self.problem is None


def find_attentions(graph, allow_mask: bool = False) -> list[AttentionMatch]:
    """Walk back and forth from every ``Softmax`` of an ``onnx.GraphProto``.

    A Softmax is a fusable attention when, walking towards the inputs, it meets at most one
    ``Mul``/``Div`` whose other input is a constant scalar (the scale), with ``allow_mask`` one
    ``Add`` after it (the attention mask), and then a ``MatMul``; its output feeds exactly one
    node, a ``MatMul``; and every intermediate tensor has exactly one consumer (a tensor that
    escapes the chain cannot stay inside a fused kernel). Anything else (``Cast``, ``Reshape``,
    ``Where``, an ``Add`` where no mask belongs such as ``baddbmm``'s ``+ 0·empty``) is a
    problem. A graph input or output in the chain is one too.
    """
    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    for o in graph.output:  # a graph output is a use that escapes the chain as well
        consumers[o.name].append(None)
    constants = _scalar_constants(graph)
    matches = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        name = node.name or node.output[0]
        chain, problem = ["Softmax"], None
        users = consumers[node.output[0]]
        if len(users) != 1 or users[0] is None or users[0].op_type != "MatMul":
            problem = f"Softmax output feeds {_ops(users)}, not one MatMul"
        elif users[0].input[0] != node.output[0]:
            problem = "Softmax output is the second MatMul input, not the first"
        else:
            chain.append("MatMul")
        cur, seen_scale, seen_mask = node, False, False
        src = node.input[0]
        while problem is None:
            prev = producer.get(src)
            if prev is None:
                problem = f"{cur.op_type} input {src!r} is a graph input/initializer, not a MatMul"
                break
            if len(consumers[src]) != 1:
                problem = f"{prev.op_type} output {src!r} has {len(consumers[src])} consumers"
                break
            if prev.op_type == "MatMul":
                chain.insert(0, "MatMul")
                break
            if prev.op_type in SCALE_OPS and not seen_scale:
                # walking backwards the scale comes after (is further from Softmax than) the mask
                data = [i for i in prev.input if i not in constants]
                if len(data) != 1 or (prev.op_type == "Div" and prev.input[0] != data[0]):
                    problem = f"{prev.op_type} before Softmax is not a scaling by a constant scalar"
                    break
                seen_scale, src = True, data[0]
            elif prev.op_type == "Add" and allow_mask and not seen_mask and not seen_scale:
                chained = [i for i in prev.input if _scores(producer, i)]
                if len(chained) != 1:
                    problem = "Add before Softmax is not an attention mask added to the scores"
                    break
                seen_mask, src = True, chained[0]
            else:
                problem = f"{prev.op_type} between the first MatMul and Softmax blocks the fusion"
                break
            chain.insert(0, prev.op_type)
            cur = prev
        matches.append(AttentionMatch(name, tuple(chain), problem))
    return matches


def _ops(nodes) -> list[str]:
    return ["<graph output>" if n is None else n.op_type for n in nodes]


def _scores(producer: dict, tensor: str) -> bool:
    """Whether ``tensor`` is attention scores: a MatMul output, or one scaled once."""
    node = producer.get(tensor)
    if node is None:
        return False
    if node.op_type in SCALE_OPS:
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "MatMul"


def _scalar_constants(graph) -> set[str]:
    """Names of tensors that are constant scalars (or one-element tensors)."""
    out = {t.name for t in graph.initializer if int(np.prod(t.dims)) == 1}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and int(np.prod(a.t.dims)) == 1:
                    out.add(n.output[0])
                elif a.name in ("value_float", "value_int"):
                    out.add(n.output[0])
    return out


def attention_summary(graph, allow_mask: bool = False) -> dict:
    """``{"total": n, "fusable": k, "problems": [...]}`` for the manifest."""
    matches = find_attentions(graph, allow_mask)
    return {
        "total": len(matches),
        "fusable": sum(m.fusable for m in matches),
        "problems": [f"{m.softmax}: {m.problem}" for m in matches if not m.fusable],
    }
