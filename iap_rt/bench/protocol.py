"""The parent <-> worker protocol of ``iap-rt bench``: one subprocess per backend.

The parent writes a :class:`WorkerSpec` as JSON, runs the backend's worker module
(:data:`WORKER_MODULES`) as ``python -m MODULE worker SPEC_JSON RESULT_JSON`` and reads the result
JSON back: the raw timings of every run (:func:`measure`) or ``{"status": "unavailable" |
"error", "reason": ...}``. Both sides of the protocol live here; the workers themselves are
:mod:`iap_rt.bench.worker` (ort, trt; no torch) and :mod:`iap_rt.train.bench_torch` (torch,
torch-compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import iap_rt
from iap_rt.bench.config import NEGATIVE_PROMPT, PROMPT, TORCH_BACKENDS
from iap_rt.bench.machine import loadavg, peak_rss_mb
from iap_rt.errors import BackendUnavailableError, IapRtError
from iap_rt.fileio import write_json_atomic, write_text_atomic

# backend -> the module its worker process runs (``python -m MODULE worker SPEC OUT``)
WORKER_MODULES = {
    **{b: "iap_rt.train.bench_torch" for b in TORCH_BACKENDS},
    **{b: "iap_rt.bench.worker" for b in ("ort", "ort-graph", "trt")},
}


@dataclass
class WorkerSpec:
    """Everything a worker needs, as JSON (stages hand over through files)."""

    backend: str
    model_dir: str
    base_dir: str | None
    encoder_dir: str | None
    height: int
    width: int
    steps: int
    batch_size: int
    guidance: float
    scheduler: str
    seed: int
    repeat: int
    warmup: int
    threads: int | None
    device: str
    latents_out: str | None = None  # final latents of the last measured run (.npy)
    images_out: str | None = None  # its images, uint8 (B, H, W, 3) (.npy)
    more_steps: list[int] = field(default_factory=list)  # step counts measured after ``steps``
    ort_unet: str = "fused"  # ort/ort-graph: unet.ort.onnx where exported, or "exported"
    prompt: str = PROMPT
    negative_prompt: str = NEGATIVE_PROMPT

    def pipeline_args(self, steps: int | None = None) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the image every backend generates (at ``steps``, default the
        spec's): the runtime's :class:`~iap_rt.pipeline.Pipeline` and its torch twin take the
        same call."""
        kwargs = {
            "steps": steps or self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "height": self.height,
            "width": self.width,
            "batch_size": self.batch_size,
            "scheduler": self.scheduler,
        }
        return (self.prompt, self.negative_prompt), kwargs


@dataclass
class RunTimes:
    """One generated image's timings (seconds)."""

    text_encoder_s: float
    unet_s: list[float]  # per step
    loop_s: float
    vae_decode_s: float
    e2e_s: float
    # process CPU time (all threads) per UNet step: robust to other processes taking the
    # cores, which wall time is not (but an ORT worker thread's spin-wait counts)
    unet_cpu_s: list[float] = field(default_factory=list)

    @property
    def overhead_step_s(self) -> float:
        """Denoising loop time not spent in the UNet, per step."""
        return max(0.0, self.loop_s - sum(self.unet_s)) / max(1, len(self.unet_s))

    @classmethod
    def from_timings(cls, t, unet_cpu_s: list[float]) -> RunTimes:
        """From a pipeline's ``Timings`` (runtime or torch twin) + the UNet CPU times."""
        return cls(
            t.text_encoder_s, list(t.unet_s), t.loop_s, t.vae_decode_s, t.total_s, unet_cpu_s
        )


@dataclass
class LoadedBackend:
    """A backend loaded in a worker, ready to generate the spec's image again and again."""

    # one image at STEPS steps -> (timings, final latents, uint8 images)
    generate: Callable[[int], tuple[RunTimes, np.ndarray, np.ndarray]]
    device: str  # what it runs on, in words (recorded in the result)
    load_start: float  # perf_counter() when loading began (after imports): cold start origin
    close: Callable[[], None] = lambda: None
    peak_gpu_mb: Callable[[], float | None] = lambda: None
    extra: Callable[[], dict] = dict  # backend facts, asked after the runs


def measure(spec: WorkerSpec, load: Callable[[WorkerSpec], LoadedBackend]) -> dict:
    """Measure one backend in this process: cold start, warm-up, ``repeat`` runs, then
    ``repeat`` runs at each of ``more_steps`` with the same loaded backend."""
    load_before = loadavg()
    t_import = time.perf_counter()
    backend = load(spec)
    load_s = time.perf_counter() - backend.load_start
    first, latents, images = backend.generate(spec.steps)
    cold_start_s = time.perf_counter() - backend.load_start
    for _ in range(spec.warmup - 1):
        backend.generate(spec.steps)
    runs = []
    for _ in range(spec.repeat):
        times, latents, images = backend.generate(spec.steps)
        runs.append(times)
    more = {
        str(steps): [asdict(backend.generate(steps)[0]) for _ in range(spec.repeat)]
        for steps in spec.more_steps
    }
    if spec.latents_out:
        np.save(spec.latents_out, latents)
    if spec.images_out:
        np.save(spec.images_out, images)
    out = {
        "backend": spec.backend,
        # where this worker imported iap_rt from (an install, or a checkout that shadows it)
        "iap_rt": os.path.dirname(os.path.abspath(iap_rt.__file__)),
        "device": backend.device,
        "steps": spec.steps,
        "import_s": backend.load_start - t_import,
        "load_s": load_s,
        "first_image_s": first.e2e_s,
        "cold_start_s": cold_start_s,
        "runs": [asdict(r) for r in runs],
        "runs_by_steps": more,  # more_steps: {"50": [runs]}
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": backend.peak_gpu_mb(),
        "loadavg": [load_before, loadavg()],  # machine load before/after (shared machines)
        "latents_absmax": float(np.abs(latents).max()),
        **backend.extra(),
    }
    backend.close()
    return out


def worker_main(spec_file: str, out_file: str, load: Callable[[WorkerSpec], LoadedBackend]) -> int:
    """A worker process's body: ``spec_file`` -> measure with ``load`` -> ``out_file``, always.

    A backend that cannot run here (:class:`BackendUnavailableError`, a missing package) is
    ``unavailable``; any other failure is an ``error`` with its reason (and the traceback on
    stderr): the parent reports both, it never sees a silent crash.
    """
    spec = WorkerSpec(**json.loads(Path(spec_file).read_text("utf-8")))
    try:
        result = measure(spec, load)
    except (BackendUnavailableError, ImportError) as e:
        result = {"status": "unavailable", "reason": str(e)}
    except IapRtError as e:
        result = {"status": "error", "reason": str(e)}
    except Exception as e:  # a crash inside a backend: report it, do not hide it
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:500]}"}
    write_json_atomic(out_file, result)
    return 0


# ---- the parent's side -------------------------------------------------------------------------
def child_env(threads: int | None) -> dict:
    """The environment of a worker or build process: thread counts, offline hub, quiet."""
    env = dict(os.environ)
    n = str(threads or os.cpu_count() or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = n
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def last_line(text: str) -> str:
    """The last non-empty line of a process's output (the error, usually), shortened."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "(no output)"


def tail(text: str | bytes | None, lines: int = 60) -> str:
    """The last ``lines`` lines of a process's output (a whole traceback, usually)."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def spawn_worker(
    spec: WorkerSpec, workdir: Path, threads: int | None, timeout: float | None = None
) -> dict:
    """Run one worker subprocess in ``workdir``; return its result or ``{"status": ...,
    "reason": ...}`` (a failed worker's result also carries its output's ``log`` tail).
    A worker still running after ``timeout`` seconds is killed (a hung CUDA call, a stuck
    compile): ``{"status": "error", "reason": "timed out ...", "timed_out": True}``.

    The worker runs with ``workdir`` as its working directory: ``python -m`` puts the working
    directory first on ``sys.path``, so a worker started from a source checkout's root would
    import the checkout's ``iap_rt/`` (which has no ``train`` or ``export``: those live in
    other folders and exist as ``iap_rt.*`` only in an install) instead of the installed one.
    Every path in ``spec`` is absolute for that reason."""
    spec_file = workdir / f"{spec.backend}.spec.json"
    out_file = workdir / f"{spec.backend}.result.json"
    write_text_atomic(spec_file, json.dumps(asdict(spec), ensure_ascii=False))
    module = WORKER_MODULES[spec.backend]
    cmd = [sys.executable, "-m", module, "worker", str(spec_file), str(out_file)]
    try:
        proc = subprocess.run(
            cmd, env=child_env(threads), capture_output=True, text=True, timeout=timeout,
            cwd=workdir,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:  # run() has killed the worker
        return {
            "status": "error",
            "reason": f"timed out after {timeout:g} s (killed; last output: "
            f"{last_line(tail(e.stderr, 1))})",
            "timed_out": True,
            "log": tail(e.stderr),
        }
    if out_file.is_file():
        result = json.loads(out_file.read_text("utf-8"))
        if result.get("status") == "error":
            result["log"] = tail(proc.stderr)
        return result
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}"
        if proc.returncode == -9:
            why += " (out of memory?)"
    else:
        why = f"exit code {proc.returncode}: {last_line(proc.stderr)}"
    return {"status": "error", "reason": why, "log": tail(proc.stderr)}
