"""The ``ort``/``ort-graph``/``trt`` worker of ``iap-rt bench``: our runtime pipeline
(:class:`iap_rt.pipeline.Pipeline`) in its own process, never importing torch.

    python -m iap_rt.bench.worker worker SPEC_JSON RESULT_JSON

(the parent, :func:`iap_rt.bench.protocol.spawn_worker`, runs it; see that module for the
protocol).
"""

from __future__ import annotations

import os
import sys
import time

from iap_rt.bench.machine import process_gpu_mb
from iap_rt.bench.protocol import LoadedBackend, RunTimes, WorkerSpec, worker_main
from iap_rt.errors import ArtifactError, BackendUnavailableError


def load_runtime(spec: WorkerSpec) -> LoadedBackend:
    """Our runtime (iap_rt.pipeline) on ORT or TensorRT, loaded inside the cold-start clock."""
    import onnxruntime  # noqa: F401 - imported before the cold-start clock starts

    from iap_rt.backends import get_backend
    from iap_rt.modeldir import ModelDir
    from iap_rt.pipeline import Pipeline

    load_start = time.perf_counter()
    model = ModelDir.open(spec.model_dir)
    if spec.backend in ("ort", "ort-graph"):
        graph = spec.backend == "ort-graph"
        device = spec.device
        if graph:  # a CUDA graph has no CPU form: say so rather than fall back
            if device == "cpu":
                raise BackendUnavailableError(
                    "ort-graph captures CUDA graphs: it needs the CUDA execution provider",
                    fix="drop --device cpu (and install onnxruntime-gpu on a GPU machine).",
                )
            device = "cuda"
        backend = get_backend(
            "ort",
            model,
            device=device,
            threads=spec.threads,
            cuda_graph=graph,
            fused_unet=spec.ort_unet == "fused",
        )
    else:
        try:
            # eager: TensorRT-RTX compiles the shape-specialised kernels before the first
            # image; its default (lazy) runs the first images on fallback kernels while they
            # compile in the background, so the measured runs would time a moving target
            backend = get_backend("trt", model, kernel_specialization="eager")
        except ImportError as e:
            raise BackendUnavailableError(
                f"the TensorRT runtime backend is not available ({e})",
                fix="install the trt extras on a machine with an NVIDIA GPU and build engines "
                f"(iap-rt engines build --model {spec.model_dir}).",
            ) from e
    pipe = Pipeline(model, backend, progress=False)
    try:
        pipe.runners  # noqa: B018 - create the sessions/engines now (inside the cold start)
    except ArtifactError as e:
        if spec.backend != "trt":
            raise
        raise BackendUnavailableError(
            f"no usable TensorRT engines: {e}",
            fix=f"build them first: iap-rt engines build --model {spec.model_dir}",
        ) from e
    unet_cpu: list[float] = []
    runners = pipe.runners  # the pipeline looks its runners up in this dict every call
    runners["unet"] = CpuTimedRunner(runners["unet"], unet_cpu)

    def generate(steps: int):
        args, kwargs = spec.pipeline_args(steps)
        # a fresh prompt encoding every image: the pipeline caches embeddings per prompt
        pipe.clear_cache()
        res = pipe(*args, **kwargs)
        times = RunTimes.from_timings(res.timings, list(unet_cpu))
        unet_cpu.clear()
        return times, res.latents, res.images

    device = backend.device
    if spec.backend.startswith("ort") and device == "cuda":
        device = "cuda (CUDAExecutionProvider, IO binding"
        device += ", CUDA graph)" if spec.backend == "ort-graph" else ")"

    def extra() -> dict:  # asked after the runs: CUDA graphs are captured on first use
        # the graphs' own precisions (ORT runs them as they are, TensorRT strongly typed)
        out: dict = {"precision": {n: model.precision(n) for n in runners}}
        if spec.backend.startswith("ort"):
            out["unet_graph"] = os.path.basename(pipe.runners["unet"].runner.path)
        if spec.backend == "ort-graph":
            out["cuda_graph"] = graph_status(pipe.runners)
        return out

    return LoadedBackend(
        generate,
        device,
        load_start,
        close=backend.close,
        peak_gpu_mb=lambda: process_gpu_mb(os.getpid()),
        extra=extra,
    )


def graph_status(runners: dict) -> dict:
    """Per network: True where ONNX Runtime captured a CUDA graph, else why it did not."""
    status = {}
    for name, runner in runners.items():
        runner = getattr(runner, "runner", runner)  # unwrap CpuTimedRunner
        if getattr(runner, "cuda_graph", False):
            status[name] = runner.cuda_graph_error or True
    return status


class CpuTimedRunner:
    """Wraps a runner; appends the process CPU time of each ``run`` to ``sink``."""

    def __init__(self, runner, sink: list[float]):
        self.runner, self.sink, self.name = runner, sink, runner.name

    def run(self, feeds):
        """The wrapped runner's ``run``, its process CPU time appended to the sink."""
        c0 = time.process_time()
        out = self.runner.run(feeds)
        self.sink.append(time.process_time() - c0)
        return out


def main(argv: list[str]) -> int:
    """``worker SPEC_JSON RESULT_JSON``."""
    if len(argv) != 3 or argv[0] != "worker":
        print("usage: python -m iap_rt.bench.worker worker SPEC_JSON RESULT_JSON", file=sys.stderr)
        return 2
    return worker_main(argv[1], argv[2], load_runtime)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
