"""PyTorch module -> ONNX file (dynamo exporter), dims named after the shape contract,
validated against PyTorch in ONNX Runtime."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from iap_rt.export.configs import NetworkExportConfig

from iap_rt.errors import ExportValidationError
from iap_rt.fileio import atomic_path
from iap_rt.specs import ModelDims

log = logging.getLogger("iap_rt.export")


def _torch_inputs(feeds: dict[str, np.ndarray]) -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())


def export_onnx(
    module: torch.nn.Module,
    cfg: NetworkExportConfig,
    dims: ModelDims,
    precision: str,
    path: str | os.PathLike,
    opset: int,
    vocab_size: int = 100,
) -> Path:
    """Export ``module`` (already wrapped, eval, in its precision) to ``path`` atomically."""
    import tempfile

    import onnx

    path = Path(path)
    spec = cfg.spec
    feeds = spec.dummy_inputs(dims, precision, cfg.cases[0], vocab_size=vocab_size)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as work:
        raw = Path(work) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                _torch_inputs(feeds),
                str(raw),
                dynamo=True,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=cfg.dynamic_shapes(),
                external_data=False,
                verbose=False,
            )
        model = onnx.load(str(raw))
        name_axes(model, cfg)
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
    return path


def name_axes(model, cfg: NetworkExportConfig) -> None:
    """Rename the graph's input/output dim params to the spec's axis symbols."""
    decl = {t.name: t.axes for t in cfg.spec.tensors()}
    dyn = cfg.spec.dynamic_axes()
    for vi in list(model.graph.input) + list(model.graph.output):
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if i in dyn.get(vi.name, {}):
                d.dim_param = decl[vi.name][i]


def ort_session(path: str | os.PathLike):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = min(4, os.cpu_count() or 1)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validate_onnx(
    module: torch.nn.Module,
    cfg: NetworkExportConfig,
    dims: ModelDims,
    precision: str,
    path: str | os.PathLike,
    vocab_size: int = 100,
) -> tuple[list[dict], list[dict]]:
    """Run ONNX Runtime vs PyTorch at every validation case.

    Returns ``(report, mismatches)``: one row per case and output with its max abs diff.
    """
    sess = ort_session(path)
    report, mismatches = [], []
    tol = cfg.atol[precision]
    for k, case in enumerate(cfg.cases):
        feeds = cfg.spec.dummy_inputs(dims, precision, case, seed=100 + k, vocab_size=vocab_size)
        got = sess.run(cfg.spec.output_names, feeds)
        with torch.no_grad():
            want = module(*_torch_inputs(feeds))
        want = want if isinstance(want, (tuple, list)) else (want,)
        for name, g, w in zip(cfg.spec.output_names, got, want):
            w = w.float().numpy()
            g = g.astype(np.float32)
            diff = float(np.abs(g - w).max()) if g.shape == w.shape else float("inf")
            row = {
                "network": cfg.spec.name,
                "output": name,
                "case": ",".join(f"{a}={v}" for a, v in case.items()),
                "max_abs_diff": diff,
                "tolerance": tol,
            }
            report.append(row)
            if not diff <= tol:
                mismatches.append(row)
    return report, mismatches


def raise_on_mismatch(mismatches: list[dict]) -> None:
    if mismatches:
        raise ExportValidationError(
            mismatches,
            fix="check the export wrapper / precision (try without --fp16), or report a bug "
            "with the listed networks.",
        )
