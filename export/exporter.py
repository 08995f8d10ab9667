"""PyTorch module -> cleaned ONNX file (dynamo exporter), validated in ONNX Runtime.

The steps for one network, in the order :func:`iap_rt.export.stage.export_model_dir` runs
them (so the fp32 module, the exporter's copy and the ONNX Runtime session are never all in
memory at once):

1. :func:`reference_outputs`: the fp32 PyTorch outputs at every validation case;
2. :func:`dynamo_export`: ``module.half()`` for fp16, ``torch.onnx.export(dynamo=True)``;
3. :func:`finish_onnx`: cleanup, spec axis names, external data past 512 MiB, shape inference;
4. :func:`validate_onnx`: ONNX Runtime at the same cases, every output's max abs diff.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from iap_rt.errors import ExportValidationError
from iap_rt.export.graph import (
    EXTERNAL_DATA_THRESHOLD,
    attention_summary,
    cleanup,
    infer_shapes,
    initializer_bytes,
    load_small_tensors,
    name_axes,
    restore_external,
    save_model,
)
from iap_rt.export.networks import NetworkExportConfig
from iap_rt.specs import ModelDims


def _torch_inputs(feeds: dict[str, np.ndarray], fp32: bool = False) -> tuple:
    """numpy feeds -> torch tensors, floating ones upcast to float32 with ``fp32``."""
    tensors = (torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    return tuple(t.float() if fp32 and t.is_floating_point() else t for t in tensors)


def reference_outputs(
    module: torch.nn.Module,
    cfg: NetworkExportConfig,
    dims: ModelDims,
    precision: str,
    vocab_size: int,
) -> list[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """``[(feeds, fp32 outputs)]`` per validation case; feeds are in ``precision``, the fp32
    module sees them upcast (exact), so fp16 is judged against the fp32 reference."""
    cases = []
    with torch.inference_mode():
        for k in range(len(cfg.cases)):
            feeds = cfg.feeds(dims, precision, k, vocab_size)
            out = module(*_torch_inputs(feeds, fp32=True))
            out = out if isinstance(out, (tuple, list)) else (out,)
            cases.append((feeds, [o.float().numpy() for o in out]))
    return cases


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress prints and the optimizer's folding warnings."""
    names = ("torch.onnx", "onnxscript", "torch.export", "torch._export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def dynamo_export(
    module: torch.nn.Module,
    cfg: NetworkExportConfig,
    dims: ModelDims,
    precision: str,
    path: str | os.PathLike,
    opset: int,
    vocab_size: int,
) -> Path:
    """``torch.onnx.export(dynamo=True)`` of ``module`` (wrapped, eval, fp32; converted in place
    to fp16 for ``precision="fp16"``) to a raw file beside ``path``; return the raw file.

    The caller drops ``module`` before :func:`finish_onnx` loads the raw file, so the PyTorch
    weights and the ONNX copy of them are not in memory together.
    """
    path = Path(path)
    spec = cfg.spec
    if precision == "fp16":
        module.half()
    example = _torch_inputs(cfg.feeds(dims, precision, 0, vocab_size))
    raw = path.with_name(f".{path.stem}.raw.onnx")
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=cfg.dynamic_shapes(),
            verbose=False,
        )
        program.save(str(raw), external_data=True)  # graph + raw.onnx.data
        del program
        release_exporter_references()
    return raw


def release_exporter_references() -> None:
    """Drop what onnxscript keeps of the last exported model.

    onnxscript 0.7's pattern matchers are module-level objects (the rewrite rules the
    exporter's optimizer runs) and keep the last graph they matched, and through it every
    weight of the exported model, until the next export: 1.7 GB after the fp16 SD 1.5 UNet.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to release
        return
    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_tracer", "_current_node"):
                if attr in obj.__dict__:
                    setattr(obj, attr, None)
            if "_match" in obj.__dict__:
                obj._init_match(0)
    gc.collect()


def finish_onnx(raw: Path, path: str | os.PathLike, cfg: NetworkExportConfig) -> tuple[list, dict]:
    """Cleanup, spec axis names, save and shape inference of the raw export.

    The graph is cleaned while the weights stay in the raw data file; then models under
    ``EXTERNAL_DATA_THRESHOLD`` (512 MiB) load them and are saved as one file, bigger ones (the
    SD UNet) keep the raw data file as ``<name>.onnx.data``. At most one copy of the weights is in memory (plus its
    serialisation), none for the big ones.
    Returns the files written and the graph facts for the manifest (node count, attention
    summary, axis names). The raw files are removed.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    raw_data = raw.with_name(raw.name + ".data")
    try:
        model = onnx.load(str(raw), load_external_data=False)
        loaded = load_small_tensors(model, raw.parent)
        model, folded = cleanup(model, raw.parent, cfg.spec.name)
        axes = name_axes(model, cfg.spec)
        facts = {
            "constant_folding": "done" if folded else "failed (see the export's warning)",
            "nodes": len(model.graph.node),
            "attention": attention_summary(model.graph, cfg.attention_mask),
            "axes": sorted(set(axes.values())),
        }
        if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            restore_external(model, loaded)
            files = save_model(model, path, data_file=raw_data)
        else:
            load_external_data_for_model(model, str(raw.parent))
            files = save_model(model, path)
        del model  # before shape inference reads the file back
        infer_shapes(files[0])
    finally:
        raw.unlink(missing_ok=True)
        raw_data.unlink(missing_ok=True)
    return files, facts


def ort_session(path: str | os.PathLike):
    """A CPU session for validation, with few threads (OMP_NUM_THREADS if set: the machine may
    be shared)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    so.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    so.log_severity_level = 3
    # basic optimisations only: validation checks the graph as exported, and the extended ones
    # (fp16 Cast folding, weight prepacking) cost SD 1.5 ~1.2 GB and 10 s per session
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validate_onnx(
    path: str | os.PathLike,
    cfg: NetworkExportConfig,
    precision: str,
    references: list[tuple[dict[str, np.ndarray], list[np.ndarray]]],
) -> tuple[list[dict], list[dict]]:
    """Run ONNX Runtime at every validation case against the fp32 PyTorch outputs.

    Returns ``(report, mismatches)``: one row per case and output with its max abs diff and
    tolerance; ``mismatches`` are the rows over tolerance (or with a wrong shape or NaN).
    """
    sess = ort_session(path)
    report, mismatches = [], []
    for k, (feeds, want) in enumerate(references):
        got = sess.run(cfg.spec.output_names, feeds)
        for name, g, w in zip(cfg.spec.output_names, got, want):
            g = g.astype(np.float32)
            ref_max = float(np.abs(w).max())
            diff = float(np.abs(g - w).max()) if g.shape == w.shape else float("inf")
            tol = cfg.tolerance(precision, ref_max)
            row = {
                "network": cfg.spec.name,
                "output": name,
                "case": ",".join(f"{a}={v}" for a, v in cfg.cases[k].items()),
                "precision": precision,
                "reference": "torch fp32",
                "max_abs_diff": diff,
                "reference_absmax": ref_max,
                "tolerance": tol,
            }
            if g.shape != w.shape:
                row["shape"] = f"{g.shape} != {w.shape}"
            report.append(row)
            if not diff <= tol:  # NaN fails too
                mismatches.append(row)
    return report, mismatches


def raise_on_mismatch(mismatches: list[dict]) -> None:
    if mismatches:
        raise ExportValidationError(
            mismatches,
            fix="nothing was written (the previous model directory is untouched). Check the "
            "export wrapper / precision (try without --fp16, or drop --fp16-vae), or report a "
            "bug with the listed networks.",
        )
