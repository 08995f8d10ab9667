"""ONNX Runtime backend: CPU execution provider, or CUDA with IO binding when
``onnxruntime-gpu`` is installed (auto-selected)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import numpy as np

from iap_rt.backends.base import Backend
from iap_rt.errors import (
    ArtifactError,
    ArtifactMismatchError,
    BackendUnavailableError,
    ConfigError,
)
from iap_rt.modeldir import REEXPORT, ModelDir
from iap_rt.onnxsig import read_inputs
from iap_rt.ortinfo import GPU_INSTALL, available_providers, preload_cuda_libraries
from iap_rt.specs import CORE_NETWORKS, ModelDims, NetworkSpec

log = logging.getLogger("iap_rt.backends.ort")

_SHARED_ARENA: list = []  # the process's shared CPU arena, once registered
ONE_SHOT_NETWORKS = ("vae_decoder", "vae_encoder")  # one call per image, not per step


def register_shared_cpu_arena() -> bool:
    """Register one CPU arena in ONNX Runtime's environment (once per process), for every
    session created with ``session.use_env_allocators``.

    By default each session grows an arena of its own and keeps it: after the denoising loop
    the UNet's activation memory sits idle while the VAE decoder's first call grows a second
    arena (fresh pages, first-touch faults) and its second call a third block for its memory
    pattern. Sharing one arena, the decoder reuses what the UNet freed (measured in
    ``bench/results/vae_gap_sd15_cpu.json``). Returns whether the process has it: an ONNX
    Runtime that cannot register one keeps per-session arenas (logged once)."""
    if _SHARED_ARENA:
        return _SHARED_ARENA[0] is not None
    import onnxruntime as ort

    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)  # fmt: skip
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT defaults
    except (AttributeError, RuntimeError, TypeError) as e:  # an older or unusual build
        log.warning("ONNX Runtime cannot share one CPU arena (%s); each session keeps its own", e)
        info = None
    _SHARED_ARENA.append(info)
    return info is not None


class OrtRunner:
    """One network in ONNX Runtime; checks feeds against the shape contract.

    ``binding``:
      - ``None``: ``session.run`` with numpy feeds (CPU).
      - ``"cuda"`` / ``"cpu"``: IO binding to buffers that stay bound between calls: inputs
        and outputs are ``OrtValue`` objects allocated once per set of shapes on that device;
        each call copies the feeds into them (``update_inplace``), runs, and copies the
        outputs back to numpy. The buffers are re-allocated when the shapes change.
      - with ``cuda_graph`` (``binding="cuda"`` only): each set of shapes gets its own
        session with the dynamic axes frozen to those sizes
        (``add_free_dimension_override_by_name``, so every shape computation folds into a
        constant and all nodes can sit on the CUDA provider) and ``enable_cuda_graph``, so
        ONNX Runtime captures the network once and replays it (this needs the fixed buffer
        addresses above; a network whose shapes change, e.g. the text encoder going from 2
        prompts to 1 once the negative prompt is cached, gets a new session). Recipe of ONNX
        Runtime's own Stable Diffusion demo
        (``onnxruntime/python/tools/transformers/models/stable_diffusion/ort_utils.py``,
        MIT). If ONNX Runtime refuses the capture, the runner falls back to plain binding
        and says why in ``cuda_graph_error``.

    The inputs are checked against the shape contract from the ONNX file itself (no weights
    read, :mod:`iap_rt.onnxsig`), so a network costs one session per use: the plain session
    is opened at load, except under ``cuda_graph``, where the first call opens the graph
    session of its shapes (and the plain one only if ONNX Runtime refuses the capture).
    """

    def __init__(
        self,
        spec: NetworkSpec,
        path,
        dims: ModelDims,
        precision: str,
        providers: list,
        make_options: Callable,
        binding: str | None = None,
        cuda_graph: bool = False,
        device_id: int = 0,
    ):
        if cuda_graph and binding != "cuda":
            raise ConfigError(
                "CUDA graphs need the CUDA execution provider",
                fix="use OrtBackend(device='cuda') or turn cuda_graph off.",
            )
        self.name = spec.name
        self.spec, self.dims, self.precision = spec, dims, precision
        self.path = str(path)
        self.providers, self.make_options = providers, make_options
        self.binding, self.device_id = binding, device_id
        self.cuda_graph = cuda_graph
        self.cuda_graph_error: str | None = None
        self.output_names = spec.output_names
        self._check_signature(path)
        self.sessions_opened = 0
        # under cuda_graph each set of shapes gets its own session, opened on first use
        self.session = None if cuda_graph else self._open()
        self._bound: _Bound | None = None

    def _open(self, options=None, providers=None):
        import onnxruntime as ort

        providers = providers or self.providers
        try:
            session = ort.InferenceSession(
                self.path, options or self.make_options(), providers=providers
            )
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise ArtifactError(
                f"ONNX Runtime cannot load {self.path}: {str(e).splitlines()[0][:300]}",
                fix=REEXPORT.format(path=os.path.dirname(self.path)),
            ) from e
        self.sessions_opened += 1
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if first not in session.get_providers():
            # ONNX Runtime only warns and runs on the CPU when a provider's libraries (CUDA,
            # cuDNN) do not load: that must not pass for a CUDA run
            raise BackendUnavailableError(
                f"ONNX Runtime could not start {first} for {self.path} (it has "
                f"{session.get_providers()}); its CUDA/cuDNN libraries did not load",
                fix=f"{GPU_INSTALL} (onnxruntime-gpu with its CUDA and cuDNN libraries as "
                "nvidia-* wheels) or put the CUDA and cuDNN it was built for on "
                "LD_LIBRARY_PATH; `iap-rt info` says what is missing; or run with device='cpu'.",
            )
        return session

    def _check_signature(self, path) -> None:
        got = read_inputs(path)
        want = {t.name: t.numpy_dtype(self.precision) for t in self.spec.inputs}
        if got != want:
            raise ArtifactMismatchError(
                f"{path}: inputs {_fmt(got)} do not match the {self.precision} shape contract "
                f"{_fmt(want)} (wrong precision or another spec)",
                fix=REEXPORT.format(path=os.path.dirname(path)),
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.spec.check_feeds(feeds, self.dims, self.precision)
        if self.binding is None:
            outs = self.session.run(self.output_names, feeds)
            return dict(zip(self.output_names, outs))
        if self._bound is not None and self._bound.values == values:
            return self._bound.run(feeds)
        self._bound = None  # free the old buffers (and graph session) first
        if self.cuda_graph and self.cuda_graph_error is None:
            try:  # the first run on a new graph session captures it
                self._bound = self._new_bound(self._graph_session(values), values)
                return self._bound.run(feeds)
            except Exception as e:  # noqa: BLE001 - any refusal means: run without the graph
                self.cuda_graph_error = (str(e) or repr(e)).splitlines()[0][:300]
                self._bound = None
        if self.session is None:
            self.session = self._open()
        self._bound = self._new_bound(self.session, values)
        return self._bound.run(feeds)

    def _new_bound(self, session, values: dict[str, int]) -> _Bound:
        return _Bound(
            session, self.spec, self.dims, self.precision, values, self.binding, self.device_id
        )

    def frozen_options(self, values: dict[str, int]):
        """Session options with the graph's dynamic axes fixed to ``values`` (N, B, h, w)."""
        so = self.make_options()
        for axis, size in values.items():
            so.add_free_dimension_override_by_name(axis, int(size))
        return so

    def _graph_session(self, values: dict[str, int]):
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id, "enable_cuda_graph": 1})
        return self._open(self.frozen_options(values), [cuda, "CPUExecutionProvider"])


class _Bound:
    """Inputs and outputs of one set of shapes, bound once to ``OrtValue`` objects on ``device``."""

    def __init__(self, session, spec, dims, precision, values, device: str, device_id: int):
        import onnxruntime as ort

        self.session, self.values = session, dict(values)
        shapes = spec.shapes(dims, values)
        self.binding = session.io_binding()
        self.inputs, self.outputs = {}, {}
        for group, store, bind in (
            (spec.inputs, self.inputs, self.binding.bind_ortvalue_input),
            (spec.outputs, self.outputs, self.binding.bind_ortvalue_output),
        ):
            for t in group:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    shapes[t.name], t.numpy_dtype(precision), device, device_id
                )
                store[t.name] = value
                bind(t.name, value)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in self.inputs.items():
            value.update_inplace(np.ascontiguousarray(feeds[name]))
        self.session.run_with_iobinding(self.binding)
        # a copy: the bound buffers are overwritten by the next call (on CPU, numpy() is a view)
        return {name: np.array(v.numpy(), copy=True) for name, v in self.outputs.items()}


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {getattr(v, 'name', v)}" for k, v in d.items()) + "}"


class OrtBackend(Backend):
    """ONNX Runtime. ``device``: ``auto`` (CUDA if onnxruntime-gpu has it), ``cpu``, ``cuda``.

    ``threads``: intra-op threads (default ``IAP_RT_THREADS`` or all cores). ``cuda_graph``:
    capture every network in a CUDA graph (CUDA only; see :class:`OrtRunner`).
    ``fused_unet``: run the UNet graph with ONNX Runtime's fused ``MultiHeadAttention``
    (``unet.ort.onnx``) where the export wrote one, instead of the exported ``unet.onnx``.
    """

    name = "ort"

    def __init__(
        self,
        device: str = "auto",
        threads: int | None = None,
        cuda_graph: bool = False,
        device_id: int = 0,
        fused_unet: bool = True,
        shared_arena: bool = True,
    ):
        providers = available_providers()
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
        if device == "cuda" and "CUDAExecutionProvider" not in providers:
            raise BackendUnavailableError(
                f"ONNX Runtime has no CUDA execution provider (has {providers})",
                fix=f"pip uninstall -y onnxruntime && {GPU_INSTALL} (`iap-rt info` names the "
                "installed ONNX Runtime wheel).",
            )
        if cuda_graph and device != "cuda":
            raise ConfigError(
                "CUDA graphs need the CUDA execution provider (this backend runs on the CPU)",
                fix=f"{GPU_INSTALL} and use device='cuda', or turn cuda_graph off.",
            )
        if device == "cuda":
            preload_cuda_libraries()
        self._device = device
        self.threads = threads
        self.cuda_graph, self.device_id = cuda_graph, device_id
        self.fused_unet = fused_unet
        self.shared_arena = bool(shared_arena) and device == "cpu"

    @property
    def device(self) -> str:
        return self._device

    @property
    def providers(self) -> list:
        if self._device == "cuda":
            return [
                ("CUDAExecutionProvider", {"device_id": self.device_id}),
                "CPUExecutionProvider",
            ]
        return ["CPUExecutionProvider"]

    def session_options(self, network: str | None = None):
        """The SessionOptions of one session (``network``: which one, for the per-network
        rules below)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self.threads or int(os.environ.get("IAP_RT_THREADS", 0)) or os.cpu_count()
        so.intra_op_num_threads = int(threads or 1)
        so.inter_op_num_threads = 1
        if self._device == "cpu":
            # measured (bench/README.md): spinning threads cost 4-9x on a busy 2-core CPU with
            # tiny networks, and ~2% on a quiet one at SD 1.5 size. The CPU memory arena stays
            # on: without it the SD 1.5 UNet step was 17% slower (5.0 vs 4.2 s) for 1.25 GB less.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.shared_arena and register_shared_cpu_arena():
                so.add_session_config_entry("session.use_env_allocators", "1")
            if network in ONE_SHOT_NETWORKS:
                # run once per image: a memory pattern pays off from a session's third call
                # with the same shapes, and its second call allocates the pattern's block
                # (+1.1 GB for the SD 1.5 decoder at 512x512, bench/results/vae_gap_sd15_cpu.json)
                so.enable_mem_pattern = False
        return so

    def load(self, model: ModelDir, networks=CORE_NETWORKS) -> dict[str, OrtRunner]:
        """Sessions of ``networks`` (the core ones by default: the optional networks of image
        editing are loaded when a request first needs them, see ``Pipeline.runner``)."""
        return {
            name: OrtRunner(
                model.spec(name),
                # the UNet graph with ONNX Runtime's fused attention where the export wrote
                # one (big models; CPU at SD 1.5: 2.2 GB less peak memory, bench/README.md)
                model.network_path(name, "ort" if self.fused_unet else None),
                model.dims,
                model.precision(name),
                self.providers,
                functools.partial(self.session_options, name),
                binding="cuda" if self._device == "cuda" else None,
                cuda_graph=self.cuda_graph,
                device_id=self.device_id,
            )
            for name in networks
        }
