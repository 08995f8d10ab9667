"""ONNX Runtime backend: CPU execution provider, or CUDA with IO binding when
``onnxruntime-gpu`` is installed (auto-selected)."""

from __future__ import annotations

import os

import numpy as np

from iap_rt.backends.base import Backend
from iap_rt.errors import ArtifactError, ArtifactMismatchError, BackendUnavailableError
from iap_rt.modeldir import REEXPORT, ModelDir
from iap_rt.specs import NETWORKS, ModelDims, NetworkSpec

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OrtRunner:
    """One network in one ``InferenceSession``; checks feeds against the shape contract."""

    def __init__(
        self,
        spec: NetworkSpec,
        path,
        dims: ModelDims,
        precision: str,
        providers: list,
        options,
        use_io_binding: bool,
    ):
        import onnxruntime as ort

        self.name = spec.name
        self.spec, self.dims, self.precision = spec, dims, precision
        self.path = str(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise ArtifactError(
                f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}",
                fix=REEXPORT.format(path=os.path.dirname(path)),
            ) from e
        self._check_signature(path)
        self.use_io_binding = use_io_binding
        self.output_names = spec.output_names

    def _check_signature(self, path) -> None:
        got = {i.name: _ORT_TYPES.get(i.type, i.type) for i in self.session.get_inputs()}
        want = {t.name: t.numpy_dtype(self.precision) for t in self.spec.inputs}
        if got != want:
            raise ArtifactMismatchError(
                f"{path}: inputs {_fmt(got)} do not match the {self.precision} shape contract "
                f"{_fmt(want)} (wrong precision or another spec)",
                fix=REEXPORT.format(path=os.path.dirname(path)),
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds, self.dims, self.precision)
        if not self.use_io_binding:
            outs = self.session.run(self.output_names, feeds)
            return dict(zip(self.output_names, outs))
        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {getattr(v, 'name', v)}" for k, v in d.items()) + "}"


class OrtBackend(Backend):
    """ONNX Runtime. ``device``: ``auto`` (CUDA if onnxruntime-gpu has it), ``cpu``, ``cuda``."""

    name = "ort"

    def __init__(self, device: str = "auto", threads: int | None = None):
        providers = available_providers()
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
        if device == "cuda" and "CUDAExecutionProvider" not in providers:
            raise BackendUnavailableError(
                f"ONNX Runtime has no CUDA execution provider (has {providers})",
                fix="pip install onnxruntime-gpu (a CUDA build matching your driver).",
            )
        self._device = device
        self.threads = threads

    @property
    def device(self) -> str:
        return self._device

    @property
    def providers(self) -> list:
        if self._device == "cuda":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def session_options(self):
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
        return so

    def load(self, model: ModelDir) -> dict[str, OrtRunner]:
        so = self.session_options()
        return {
            name: OrtRunner(
                NETWORKS[name],
                # on CPU, a UNet graph with ONNX Runtime's fused attention where the export
                # wrote one (big models: 2.2 GB less peak memory at SD 1.5, bench/README.md)
                model.network_path(name, "ort_cpu" if self._device == "cpu" else None),
                model.dims,
                model.precision(name),
                self.providers,
                so,
                use_io_binding=self._device == "cuda",
            )
            for name in NETWORKS
        }
