"""One ONNX file -> one serialized TensorRT engine, strongly typed, checked against the
shape contract. Works with ``tensorrt`` (>= 10) and ``tensorrt_rtx``: the module is passed in.

Precision comes from the ONNX graph (strongly typed network): TensorRT 11 has no fp16
builder flag and TensorRT-RTX is strongly typed only, so an fp16 engine needs an fp16 ONNX.
"""

from __future__ import annotations

import functools
import gc
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iap_rt.errors import EngineBuildError
from iap_rt.specs import DERIVED_AXES, DYNAMIC_AXES, ModelDims, NetworkSpec

# a fused multi-head-attention kernel, matched on the engine layer's *name* only
# (``_gemm_mha_v1_myl0_1``, ``fmha_v2_...``, ``..._flash_attn``), never on the ONNX node names a
# layer carries in its metadata: diffusers names every node of an attention block
# ``.../attentions.0/...``, so a search of the whole layer text counts unfused layers too
FUSED_ATTENTION = re.compile(r"(?:^|_)(?:gemm_)?f?mha(?:_|v\d|$)|(?:^|_)flash_?att", re.IGNORECASE)
ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")  # a layer's source ONNX nodes
UNSUPPORTED_NODE_HINT = (
    "re-export with opset 18 and plain attention (iap-rt export), or check the op against "
    "TensorRT's ONNX operator support list."
)


@dataclass
class BuildOptions:
    """What changes an engine besides its ONNX and profile (recorded in the sidecar)."""

    optimization_level: int = 3
    workspace_mb: int = 0
    detailed_profile: bool = False
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets; () = portable default

    def record(self) -> dict:
        return {
            "strongly_typed": True,
            "optimization_level": self.optimization_level,
            "workspace_mb": self.workspace_mb,
            "detailed_profile": self.detailed_profile,
            "compute_capabilities": list(self.compute_capabilities),
        }


@dataclass
class BuiltEngine:
    plan: object  # IHostMemory (buffer protocol; not copied into a bytes object)
    io: dict
    seconds: float
    timing_cache: bytes | None = None
    warnings: list[str] = field(default_factory=list)
    layers: dict | None = None  # layer_summary() of a detailed build, where TensorRT logs it


def gc_paused(fn):
    """Run ``fn`` (which drives a TensorRT builder through a Python logger) with Python's cyclic
    garbage collector collected first and then off.

    TensorRT calls the Python logger while it holds its own mutex (``createInferBuilder`` logs).
    A collection triggered by an allocation inside that callback may free an older ``IBuilder``
    kept only by a reference cycle (a failed build's traceback, say), whose destructor takes the
    same mutex: the process hangs for ever (seen with TensorRT-RTX 1.x: ``PyLogger::log`` ->
    ``gc_collect_main`` -> ``IBuilder`` dealloc -> ``pthread_mutex_lock``). Reference counting still
    frees objects while the collector is off; cycles wait for the next collection.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


def _logger(trt, sink: list[str], verbose: list[str] | None = None):
    """A TensorRT logger that keeps errors/warnings (to put in EngineBuildError), and every
    message in ``verbose`` if given (the layer dump names fused kernels)."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                sink.append(str(msg))
            if verbose is not None:
                verbose.append(str(msg))

    return Logger()


def dtype_name(trt, dt) -> str:
    try:
        return np.dtype(trt.nptype(dt)).name
    except Exception:  # bfloat16, fp8, ... have no numpy type
        return str(dt).rsplit(".", 1)[-1].lower()


def network_io(trt, network) -> dict:
    """``{"inputs": [{name, dtype, shape}], "outputs": [...]}`` of a parsed network."""

    def desc(t):
        return {"name": t.name, "dtype": dtype_name(trt, t.dtype), "shape": list(t.shape)}

    return {
        "inputs": [desc(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [desc(network.get_output(i)) for i in range(network.num_outputs)],
    }


def contract_problems(
    io: dict, spec: NetworkSpec, precision: str, dims: ModelDims, profile: dict
) -> list[str]:
    """Every way the network's I/O breaks ``spec`` (names, dtypes, ranks, static sizes)."""
    problems = []
    static = dims.static_values()
    axes_range = profile["axes"]
    for kind, decl in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        found = {t["name"]: t for t in io[kind]}
        want = [t.name for t in decl]
        if sorted(found) != sorted(want):
            problems.append(f"{kind} {sorted(found)}, the contract declares {sorted(want)}")
        for t in decl:
            got = found.get(t.name)
            if got is None:
                continue
            dt = t.numpy_dtype(precision).name
            if got["dtype"] != dt:
                problems.append(f"{t.name}: dtype {got['dtype']}, contract says {dt} ({precision})")
            if len(got["shape"]) != len(t.axes):
                problems.append(f"{t.name}: shape {got['shape']}, contract axes {t.axes}")
                continue
            for axis, d in zip(t.axes, got["shape"]):
                key = DERIVED_AXES.get(axis, axis)
                if axis in static and d not in (-1, static[axis]):
                    problems.append(
                        f"{t.name}: axis {axis} is {d}, the model's {axis} is {static[axis]}"
                    )
                elif key in DYNAMIC_AXES and d != -1 and kind == "inputs":
                    lo, _, hi = axes_range.get(key, [d, d, d])
                    size = d if axis not in DERIVED_AXES else d // dims.vae_scale_factor
                    if lo != hi or size != lo:
                        problems.append(
                            f"{t.name}: axis {axis} is fixed at {d} in the ONNX, "
                            f"the profile asks for {lo}-{hi}"
                        )
    return problems


@gc_paused
def build_engine(
    trt,
    onnx_path: Path,
    spec: NetworkSpec,
    precision: str,
    dims: ModelDims,
    profile: dict,
    options: BuildOptions,
    timing_cache: bytes | None = None,
    use_timing_cache: bool = False,
    verbose_log: list[str] | None = None,
) -> BuiltEngine:
    """Parse ``onnx_path`` strongly typed, check it against ``spec``, build one engine.

    Raises :class:`EngineBuildError` carrying the parser's / builder's messages.
    ``verbose_log``: a list that receives every TensorRT message (all severities).
    """
    messages: list[str] = []
    if options.detailed_profile and verbose_log is None:
        verbose_log = []  # the detailed layer dump is logged at verbose level
    logger = _logger(trt, messages, verbose_log)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # default in TRT 11
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        logged = [m for m in messages if m not in errors][-5:]
        raise EngineBuildError(
            f"TensorRT's ONNX parser rejected {onnx_path} ({spec.name}):\n  "
            + "\n  ".join(errors or ["no parser error recorded"])
            + ("\n  TensorRT log:\n    " + "\n    ".join(logged) if logged else ""),
            fix=UNSUPPORTED_NODE_HINT,
        )
    io = network_io(trt, network)
    problems = contract_problems(io, spec, precision, dims, profile)
    if problems:
        raise EngineBuildError(
            f"{onnx_path} breaks the shape contract of '{spec.name}' ({precision}): "
            + "; ".join(problems),
            fix="re-export the model directory with this iap-rt (iap-rt export ... --force).",
        )

    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile["shapes"].items():
        prof.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(prof)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = options.optimization_level
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.detailed_profile:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.compute_capabilities:
        _set_targets(trt, config, options.compute_capabilities)
    cache = None
    if use_timing_cache:
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None or plan.nbytes == 0:
        raise EngineBuildError(
            f"TensorRT could not build an engine for {onnx_path} ({spec.name}):\n  "
            + "\n  ".join(messages[-20:] or ["no message"]),
            fix="see the messages above; a smaller --resolution/--batch range or "
            "--workspace-mb may help.",
        )
    new_cache = bytes(config.get_timing_cache().serialize()) if cache is not None else None
    layers = layer_summary(verbose_log) if options.detailed_profile else None
    return BuiltEngine(plan, io, seconds, new_cache, messages, layers)


@dataclass(frozen=True)
class Layer:
    """One layer of a built engine: its name and the ONNX nodes it was made from."""

    name: str
    onnx_nodes: tuple[str, ...]

    @property
    def fused_attention(self) -> bool:
        return bool(FUSED_ATTENTION.search(self.name))


def log_layers(log: list[str]) -> list[Layer]:
    """The layers of TensorRT's detailed layer dump in the builder's verbose log
    (``Name: X, LayerType: ..., Metadata: [ONNX Layer: a][ONNX Layer: b]...`` lines; TensorRT-RTX
    logs it while building, even without a GPU)."""
    out = []
    for msg in log:
        for line in str(msg).splitlines():
            if line.startswith("Name: ") and ", LayerType: " in line:
                name = line[len("Name: ") : line.index(", LayerType: ")]
                out.append(Layer(name, tuple(ONNX_LAYER.findall(line))))
    return out


def inspector_layers(info: dict) -> list[Layer]:
    """The layers of the engine inspector's JSON (``get_engine_information``): dicts with
    ``Name`` and ``Metadata`` in a DETAILED build, bare names otherwise."""
    out = []
    for rec in info.get("Layers", []):
        if isinstance(rec, dict):
            meta = str(rec.get("Metadata", ""))
            out.append(Layer(str(rec.get("Name", "")), tuple(ONNX_LAYER.findall(meta))))
        else:
            out.append(Layer(str(rec), ()))
    return out


def layer_summary(log: list[str]) -> dict | None:
    """Layers of the engine from TensorRT's detailed layer dump in the verbose log: how many,
    and which are fused multi-head attention. None when the log has no layer dump."""
    layers = log_layers(log)
    if not layers:
        return None
    fused = [ly.name for ly in layers if ly.fused_attention]
    return {"layers": len(layers), "fused_attention": len(fused), "fused_attention_names": fused}


def _parser_error(err) -> str:
    where = err.node_name() or (f"node {err.node()}" if err.node() >= 0 else "")
    op = err.node_operator()
    loc = f" [{where}{': ' + op if op else ''}]" if where or op else ""
    return f"{err.desc()}{loc}"


def _set_targets(trt, config, targets: tuple[str, ...]) -> None:
    from iap_rt.errors import ConfigError

    names = ["CURRENT" if t == "current" else "SM" + t.replace(".", "") for t in targets]
    have = [n for n in trt.ComputeCapability.__members__ if n != "NONE"]
    missing = [t for t, n in zip(targets, names) if n not in have]
    if missing:
        raise ConfigError(
            f"compute capability {missing} is not a target of this TensorRT-RTX",
            fix=f"choose from {', '.join(have)} (as 8.6 for SM86, or 'current').",
        )
    config.num_compute_capabilities = len(names)
    for i, n in enumerate(names):
        config.set_compute_capability(getattr(trt.ComputeCapability, n), i)


@dataclass
class FusionReport:
    """Which ONNX Softmax nodes TensorRT put inside a fused multi-head-attention kernel."""

    softmax: list[str]  # every Softmax node of the ONNX graph
    fused: list[str]  # those a fused-attention layer of the built engine names as its source
    engine_bytes: int | None
    build_s: float

    def problems(self) -> list[str]:
        """Why the attention did not all fuse (empty: every Softmax is inside a fused kernel).
        A graph without a Softmax has no attention to check: that is a problem too, so the
        check can never pass vacuously."""
        if not self.softmax:
            return ["the graph has no Softmax node: there is no attention to check"]
        unfused = [s for s in self.softmax if s not in self.fused]
        if unfused:
            return [
                f"{len(unfused)} of {len(self.softmax)} attention Softmax nodes are not inside a "
                f"fused multi-head-attention kernel: {', '.join(unfused[:5])}"
                + (" ..." if len(unfused) > 5 else "")
            ]
        return []


def fusion_report(layers: list[Layer], softmax: list[str], engine_bytes=None, build_s=0.0):
    """Match the graph's Softmax nodes against the fused-attention layers' source nodes."""
    sources = {n for ly in layers if ly.fused_attention for n in ly.onnx_nodes}
    return FusionReport(softmax, [s for s in softmax if s in sources], engine_bytes, build_s)


def check_fusion(report: FusionReport, what: str) -> None:
    """Raise :class:`EngineBuildError` unless every attention of ``what`` became one fused
    kernel."""
    problems = report.problems()
    if problems:
        raise EngineBuildError(
            f"{what}: " + "; ".join(problems),
            fix="export with the fusable attention pattern (iap-rt export swaps in a plain "
            "MatMul -> Softmax -> MatMul processor) and fp16 (--fp16): TensorRT fuses "
            "fp16 attention with SD-sized heads only.",
        )


def softmax_nodes(onnx_path: Path) -> list[str]:
    """The names of every Softmax node of an ONNX graph (weights not loaded)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Softmax"]


@gc_paused
def fused_softmaxes(trt, onnx_path: Path, shapes: Callable[[str, tuple], tuple]) -> FusionReport:
    """Build a static engine of ``onnx_path`` with detailed layer info and report which of its
    attentions became one fused kernel. ``shapes(input_name, parsed_shape)`` gives each input's
    static shape. Works without a GPU on TensorRT-RTX, which logs the layer dump while building.
    """
    log: list[str] = []
    logger = _logger(trt, [], log)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {parser.get_error(0)}")
    cfg = builder.create_builder_config()
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    prof = builder.create_optimization_profile()
    for i in range(net.num_inputs):
        inp = net.get_input(i)
        shape = tuple(shapes(inp.name, tuple(inp.shape)))
        prof.set_shape(inp.name, shape, shape, shape)
    cfg.add_optimization_profile(prof)
    engine = builder.build_serialized_network(net, cfg)
    build_s = time.perf_counter() - t0
    layers = log_layers(log)
    nbytes = engine.nbytes if engine is not None else None
    return fusion_report(layers, softmax_nodes(onnx_path), nbytes, build_s)
