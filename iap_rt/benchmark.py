"""``iap-rt bench``: every backend side by side on the same model, prompt, seed and noise.

How a run works (:func:`run_bench`):

1. **sources**: the model directory the runtime backends run, plus the diffusers base and the
   ``chinese_encoder/`` the ``torch`` reference loads. ``tiny`` and ``sd15`` are built from
   configs with random seeded weights and exported by the project's own export stage into a
   cache directory (default ``~/.cache/iap-rt/bench``), once; latency does not depend on the
   weight values. ``toy`` needs a trained toy model directory (``--model``).
2. **one subprocess per backend** (``python -m iap_rt.benchmark worker ...``), one after the
   other, so that each backend's peak RSS (``VmHWM``) is its own and no backend warms another's
   caches. The ``ort``/``trt`` workers never import torch.
3. in each worker: load (session creation / model load) + the first image = **cold start**;
   then ``warmup - 1`` unmeasured images; then ``repeat`` measured images. Per run the
   pipeline's own timings are kept (text encoder incl. tokenizer, UNet per step, whole loop,
   VAE decode, end to end); the figures reported are medians over the runs (UNet: over every
   step of every run) with ``[min, max]`` spreads.
4. the parent adds the machine, the config, each backend's speed-up over ``torch``
   (``torch time / backend time``) and the final-latents difference to ``torch`` (a check that
   every backend did the same work), and writes the JSON (:data:`RESULT_FIELDS`).

``runtime overhead per step`` = (denoising loop time - UNet time) / steps: the scheduler, the
guidance combination, copies, dtype casts, feed checks and Python. The UNet time is measured
around the runner's ``run`` call, so feed checks inside it count as network time.

torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from iap_rt.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    BackendUnavailableError,
    ConfigError,
    IapRtError,
)

ARCHES = ("tiny", "toy", "sd15")
BACKENDS = ("torch", "torch-compile", "ort", "ort-graph", "trt")
DEVICES = ("auto", "cpu", "cuda")
ORT_UNET_GRAPHS = ("fused", "exported")
# figures every entry of ``results`` carries (medians in seconds, peak RSS in MiB)
TIMING_FIELDS = ("text_encoder_s", "unet_step_s", "vae_decode_s", "overhead_step_s", "e2e_s")
RESULT_FIELDS = ("backend", "device", *TIMING_FIELDS, "cold_start_s", "peak_rss_mb")
CONFIG_FIELDS = ("arch", "height", "width", "steps", "batch_size", "repeat")
PROMPT = "一幅山水画，远处是高山，近处有一条小船"
NEGATIVE_PROMPT = "模糊，低质量"
DEFAULT_SIZE = {"tiny": 64, "sd15": 512}  # image side; toy: the model's own size
BUILD_SEED = 0
CACHE_LAYOUT = 1  # bump when what the cache holds changes
VERSION_PACKAGES = (
    "iap-rt",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "tensorrt",
    "tensorrt-rtx",
    "tensorrt-rtx-cu13",
    "polygraphy",
)
# the diffusers scheduler the torch reference runs for each runtime scheduler name
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


@dataclass(frozen=True)
class BenchConfig:
    """One ``iap-rt bench`` invocation (the CLI's options)."""

    arch: str = "tiny"  # tiny | toy | sd15
    height: int | None = None  # image height; None: DEFAULT_SIZE / the model's size
    width: int | None = None
    steps: int = 25  # denoising steps per image
    batch_size: int = 1  # images per prompt (UNet batch 2B under guidance)
    backends: tuple[str, ...] = ("torch", "ort", "ort-graph", "trt")
    repeat: int = 3  # measured images per backend (after warm-up)
    warmup: int = 1  # unmeasured images per backend, the cold-start image included
    guidance: float = 7.5  # > 1: classifier-free guidance on
    scheduler: str | None = None  # None: the model's default
    seed: int = 0
    threads: int | None = None  # intra-op threads (torch and ORT); None: all cores
    device: str = "auto"  # auto | cpu | cuda
    fp16: bool = False  # export/run an fp16 ONNX (GPU); torch on CUDA is fp16 regardless
    ort_unet: str = "fused"  # ort backends: the fused-attention UNet graph, or "exported"
    model: str | None = None  # an existing model directory instead of the cache
    base: str | None = None  # diffusers base for the torch reference (with --model)
    encoder: str | None = None  # chinese_encoder/ for the torch reference (with --model)
    cache_dir: str | None = None  # default ~/.cache/iap-rt/bench

    def check(self) -> None:
        if self.arch not in ARCHES:
            raise ConfigError(f"unknown arch {self.arch!r}", fix=f"use one of {', '.join(ARCHES)}.")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ConfigError(
                f"unknown backend(s) {bad or '(none given)'}",
                fix=f"pass --backends as a comma-separated subset of {','.join(BACKENDS)}.",
            )
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}", fix="use auto, cpu or cuda.")
        if self.ort_unet not in ORT_UNET_GRAPHS:
            raise ConfigError(
                f"unknown --ort-unet {self.ort_unet!r}", fix=f"use {' or '.join(ORT_UNET_GRAPHS)}."
            )
        for name in ("steps", "batch_size", "repeat", "warmup"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.model is None and (self.base or self.encoder):
            raise ConfigError(
                "--base/--encoder name the torch reference's sources of a --model directory",
                fix="pass --model too, or drop --base/--encoder to use the built cache.",
            )


@dataclass
class Sources:
    """What the backends load: the model directory and the PyTorch sources of the reference."""

    model_dir: Path
    base_dir: Path | None = None
    encoder_dir: Path | None = None
    build_s: float | None = None  # seconds spent building the cache in this run (None: hit)
    torch_unavailable: str | None = None  # why the torch reference cannot run, if it cannot


# ---- 1. sources ---------------------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "iap-rt" / "bench"


def _model_ok(path: Path) -> bool:
    from iap_rt.modeldir import ModelDir

    try:
        ModelDir.open(path)
        return True
    except ArtifactError:
        return False


def prepare_sources(cfg: BenchConfig, log=print) -> Sources:
    """Resolve (building into the cache when needed) what every backend will load."""
    if cfg.model is not None:
        return _given_sources(cfg)
    if cfg.arch == "toy":
        return _toy_sources()
    precision = "fp16" if cfg.fp16 else "fp32"
    root = Path(cfg.cache_dir or default_cache_dir()) / f"{cfg.arch}-seed{BUILD_SEED}"
    sources = Sources(root / f"model-{precision}", root / "sd", root / "encoder")
    if _model_ok(sources.model_dir) and all(
        (d / ".complete").is_file() for d in (sources.base_dir, sources.encoder_dir)
    ):
        return sources
    log(
        f"building the {cfg.arch} model ({precision}, random weights, seed {BUILD_SEED}) in "
        f"{root} (once; sd15 takes minutes and ~8 GB of disk)"
    )
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "iap_rt.benchmark", "build", cfg.arch, str(root), precision]
    if cfg.threads:
        cmd.append(str(cfg.threads))
    proc = subprocess.run(cmd, env=_child_env(cfg.threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise IapRtError(
            f"building the {cfg.arch} benchmark model failed: {_last_line(proc.stderr)}",
            fix="install the export extras (pip install 'iap-rt[export]') or pass --model DIR "
            "of an exported model directory.",
        )
    sources.build_s = time.perf_counter() - t0
    return sources


def _given_sources(cfg: BenchConfig) -> Sources:
    from iap_rt.modeldir import ModelDir

    model = ModelDir.open(cfg.model)
    m = model.manifest
    base = cfg.base or m.get("base_model")
    encoder = cfg.encoder or m.get("encoder") or m.get("encoder_dir")
    sources = Sources(Path(cfg.model))
    missing = [
        name
        for name, path, sub in (("--base", base, "unet"), ("--encoder", encoder, "config.json"))
        if not path or not (Path(path) / sub).exists()
    ]
    if missing:
        sources.torch_unavailable = (
            f"the torch reference needs the PyTorch sources of {cfg.model}: pass "
            f"{' and '.join(missing)} (the diffusers base and chinese_encoder/ it was "
            "exported from)"
        )
    else:
        sources.base_dir, sources.encoder_dir = Path(base), Path(encoder)
    return sources


def _toy_sources() -> Sources:
    from iap_rt.modeldir import ModelDir
    from iap_rt.pipeline import default_model_dir

    embedded = ModelDir.open(default_model_dir())
    if embedded.model_id.startswith("toy"):
        from importlib import resources

        data = Path(str(resources.files("iap_rt") / "data"))
        return _given_sources(
            BenchConfig(
                arch="toy",
                model=str(embedded.path),
                base=str(data / "toy_base"),  # the PyTorch sources it was exported from
                encoder=str(data / "toy_encoder"),
            )
        )
    raise ArtifactNotFoundError(
        "no toy-world model is available: the toy model has not been trained yet (the "
        f"embedded model is {embedded.model_id!r})",
        fix="train and export one (iap-rt toy base ..., iap-rt train ..., iap-rt export ...) "
        "and pass --model DIR [--base BASE_DIR --encoder ENCODER_DIR].",
    )


def build_arch(arch: str, root: str | os.PathLike, precision: str = "fp32") -> Path:
    """Write ``root/sd``, ``root/encoder`` and ``root/model-<precision>`` for ``arch`` (torch).

    Each part is written once: ``.complete`` markers for the PyTorch directories, the
    manifest (written last by export) for the model directory.
    """
    from iap_rt.export.stage import export_model_dir
    from iap_rt.fileio import write_text_atomic

    root = Path(root)
    if arch == "tiny":
        from iap_rt.train.tiny import make_tiny_encoder, make_tiny_sd

        make_sd, make_encoder = make_tiny_sd, make_tiny_encoder
    elif arch == "sd15":
        from iap_rt.train.sd15 import make_sd15, make_sd15_encoder

        def make_sd(out, seed):  # the reference needs no CLIP text encoder
            return make_sd15(out, seed, text_encoder=False)

        make_encoder = make_sd15_encoder
    else:
        raise ConfigError(f"arch {arch!r} cannot be built from configs (only tiny, sd15)")
    for sub, make in (("sd", make_sd), ("encoder", make_encoder)):
        if not (root / sub / ".complete").is_file():
            shutil.rmtree(root / sub, ignore_errors=True)
            make(root / sub, seed=BUILD_SEED)
            write_text_atomic(root / sub / ".complete", f"layout {CACHE_LAYOUT}\n")
    out = root / f"model-{precision}"
    if _model_ok(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    export_model_dir(
        root / "sd",
        root / "encoder",
        out,
        model_id=f"{arch}-random-seed{BUILD_SEED}",
        fp16=precision == "fp16",
    )
    return out


# ---- 2. workers (one subprocess per backend) -------------------------------------------------
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
        return max(0.0, self.loop_s - sum(self.unet_s)) / max(1, len(self.unet_s))

    @classmethod
    def from_timings(cls, t, unet_cpu_s: list[float]) -> RunTimes:
        return cls(
            t.text_encoder_s, list(t.unet_s), t.loop_s, t.vae_decode_s, t.total_s, unet_cpu_s
        )


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
    latents_out: str | None = None
    ort_unet: str = "fused"  # ort/ort-graph: unet.ort.onnx where exported, or "exported"
    prompt: str = PROMPT
    negative_prompt: str = NEGATIVE_PROMPT


def run_worker(spec: WorkerSpec) -> dict:
    """Measure one backend in this process: cold start, warm-up, ``repeat`` runs."""
    load_before = _loadavg()
    t_import = time.perf_counter()
    if spec.backend in ("torch", "torch-compile"):
        generate, device, close = _load_torch(spec, t_import)
    else:
        generate, device, close = _load_runtime(spec)
    t0 = time.perf_counter()
    load_s = t0 - generate.load_start
    first = generate()
    cold_start_s = time.perf_counter() - generate.load_start
    for _ in range(spec.warmup - 1):
        generate()
    runs = [generate() for _ in range(spec.repeat)]
    if spec.latents_out:
        np.save(spec.latents_out, generate.last_latents)
    out = {
        "backend": spec.backend,
        "device": device,
        "import_s": generate.load_start - t_import,
        "load_s": load_s,
        "first_image_s": first.e2e_s,
        "cold_start_s": cold_start_s,
        "runs": [asdict(r) for r in runs],
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": generate.peak_gpu_mb(),
        "loadavg": [load_before, _loadavg()],  # machine load before/after (shared machines)
        "latents_absmax": float(np.abs(generate.last_latents).max()),
        **getattr(generate, "extra", dict)(),
    }
    close()
    return out


def _load_runtime(spec: WorkerSpec):
    """Our runtime (iap_rt.pipeline) on ORT or TensorRT; imports no torch."""
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
            backend = get_backend("trt", model)
        except ImportError as e:
            raise BackendUnavailableError(
                f"the TensorRT runtime backend is not available ({e})",
                fix="install the trt extras on a machine with an NVIDIA GPU and build engines "
                "(iap-rt engines --model DIR).",
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
    runners["unet"] = _CpuTimedRunner(runners["unet"], unet_cpu)

    def generate() -> RunTimes:
        # a fresh prompt encoding every image: the pipeline caches embeddings per prompt
        pipe.clear_cache()
        res = pipe(
            spec.prompt,
            spec.negative_prompt,
            steps=spec.steps,
            guidance=spec.guidance,
            seed=spec.seed,
            height=spec.height,
            width=spec.width,
            batch_size=spec.batch_size,
            scheduler=spec.scheduler,
        )
        generate.last_latents = res.latents
        times = RunTimes.from_timings(res.timings, list(unet_cpu))
        unet_cpu.clear()
        return times

    generate.load_start = load_start
    generate.last_latents = None
    generate.peak_gpu_mb = lambda: _nvidia_smi_process_mb(os.getpid())
    device = backend.device
    if spec.backend.startswith("ort") and device == "cuda":
        device = "cuda (CUDAExecutionProvider, IO binding"
        device += ", CUDA graph)" if spec.backend == "ort-graph" else ")"

    def extra() -> dict:  # asked after the runs: CUDA graphs are captured on first use
        out = {}
        if spec.backend.startswith("ort"):
            out["unet_graph"] = os.path.basename(pipe.runners["unet"].runner.path)
        if spec.backend == "ort-graph":
            out["cuda_graph"] = _graph_status(pipe.runners)
        return out

    generate.extra = extra
    return generate, device, backend.close


def _graph_status(runners: dict) -> dict:
    """Per network: True where ONNX Runtime captured a CUDA graph, else why it did not."""
    status = {}
    for name, runner in runners.items():
        runner = getattr(runner, "runner", runner)  # unwrap _CpuTimedRunner
        if getattr(runner, "cuda_graph", False):
            status[name] = runner.cuda_graph_error or True
    return status


class _CpuTimedRunner:
    """Wraps a runner; appends the process CPU time of each ``run`` to ``sink``."""

    def __init__(self, runner, sink: list[float]):
        self.runner, self.sink, self.name = runner, sink, runner.name

    def run(self, feeds):
        c0 = time.process_time()
        out = self.runner.run(feeds)
        self.sink.append(time.process_time() - c0)
        return out


class TorchReference:
    """The reference: diffusers UNet/VAE + our ChineseTextEncoder in PyTorch eager.

    fp32 on CPU; fp16 with diffusers' default SDPA attention on CUDA; optionally the UNet
    under ``torch.compile``. Same tokenizer, scheduler algorithm (diffusers' scheduler of the
    same name, configured from the model directory's ``scheduler.json``), noise and guidance
    as the runtime, so that its final latents match the runtime's.
    """

    def __init__(self, spec: WorkerSpec):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from iap_rt.modeldir import ModelDir
        from iap_rt.tokenizer import PromptTokenizer
        from iap_rt.train.encoder import ChineseTextEncoder

        self.torch, self.spec = torch, spec
        want_cuda = spec.device in ("auto", "cuda")
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "torch has no CUDA device (CPU-only build or no GPU)",
                fix="run with --device cpu, or install a CUDA build of torch on a GPU machine.",
            )
        self.dev = torch.device("cuda" if want_cuda and torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.dev.type == "cuda" else torch.float32
        if spec.threads:
            torch.set_num_threads(spec.threads)
        model = ModelDir.open(spec.model_dir)
        self.tokenizer = PromptTokenizer.from_dir(model.tokenizer_dir)
        self.scheduler_config = model.scheduler_config()
        base = Path(spec.base_dir)
        kw = {"use_safetensors": True, "torch_dtype": self.dtype}
        self.unet = UNet2DConditionModel.from_pretrained(base / "unet", **kw).to(self.dev).eval()
        self.vae = AutoencoderKL.from_pretrained(base / "vae", **kw).to(self.dev).eval()
        enc = ChineseTextEncoder.load(spec.encoder_dir)
        self.encoder = enc.to(self.dev, self.dtype).eval()
        self.compiled = spec.backend == "torch-compile"
        if self.compiled:
            self.unet = torch.compile(self.unet)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    @property
    def device_name(self) -> str:
        if self.dev.type == "cuda":
            name = self.torch.cuda.get_device_name(self.dev)
            return f"cuda ({name}, fp16, SDPA{', torch.compile' if self.compiled else ''})"
        return f"cpu (fp32, eager{', torch.compile' if self.compiled else ''})"

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def make_scheduler(self, name: str):
        import diffusers

        cls_name, extra = DIFFUSERS_SCHEDULERS[name]
        cls = getattr(diffusers, cls_name)
        sched = cls.from_config(self.scheduler_config)
        return cls.from_config(sched.config, **extra) if extra else sched

    def __call__(self):
        """One image; returns (final latents as numpy, RunTimes)."""
        from iap_rt.pipeline import initial_noise, to_uint8

        torch, spec, dev = self.torch, self.spec, self.dev
        t_start = time.perf_counter()
        do_cfg = spec.guidance > 1.0
        with torch.inference_mode():
            # 1. prompt (+ negative prompt) -> (N, S, D)
            t0 = time.perf_counter()
            texts = [spec.negative_prompt, spec.prompt] if do_cfg else [spec.prompt]
            tok = self.tokenizer(texts)
            ids = torch.from_numpy(tok.input_ids).to(dev)
            mask = torch.from_numpy(tok.attention_mask).to(dev)
            emb = self.encoder(ids, mask).to(self.dtype)
            emb = emb.repeat_interleave(spec.batch_size, dim=0)  # [neg]*B + [pos]*B
            self._sync()
            text_s = time.perf_counter() - t0
            # 2. scheduler + the runtime's initial noise
            sched = self.make_scheduler(spec.scheduler)
            sched.set_timesteps(spec.steps, device=dev)  # as diffusers' pipeline does
            f = self.vae_scale
            shape = (self.latent_channels, spec.height // f, spec.width // f)
            noise = initial_noise(spec.seed, spec.batch_size, shape)
            latents = torch.from_numpy(noise).to(dev) * sched.init_noise_sigma  # (B, C, h, w)
            # 3. denoising loop
            unet_s, unet_cpu = [], []
            t_loop = time.perf_counter()
            for t in sched.timesteps:
                x = torch.cat([latents, latents]) if do_cfg else latents  # (N, C, h, w)
                x = sched.scale_model_input(x, t).to(self.dtype)
                self._sync()
                t0, c0 = time.perf_counter(), time.process_time()
                eps = self.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
                self._sync()
                unet_s.append(time.perf_counter() - t0)
                unet_cpu.append(time.process_time() - c0)
                eps = eps.float()
                if do_cfg:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + spec.guidance * (cond - uncond)  # (B, C, h, w)
                latents = sched.step(eps, t, latents, return_dict=False)[0]
            self._sync()
            loop_s = time.perf_counter() - t_loop
            # 4. VAE decode -> uint8
            t0 = time.perf_counter()
            z = (latents / self.scaling_factor).to(self.dtype)
            image = self.vae.decode(z, return_dict=False)[0]
            self._sync()
            vae_s = time.perf_counter() - t0
            to_uint8(image.float().cpu().numpy())
            out = latents.float().cpu().numpy()
        e2e = time.perf_counter() - t_start
        return out, RunTimes(text_s, unet_s, loop_s, vae_s, e2e, unet_cpu)

    def peak_gpu_mb(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return self.torch.cuda.max_memory_reserved() / 2**20


def _load_torch(spec: WorkerSpec, t_import: float):
    if not spec.base_dir or not spec.encoder_dir:
        raise BackendUnavailableError("the torch reference has no PyTorch sources")
    try:
        import diffusers  # noqa: F401 - imported before the cold-start clock starts
        import torch  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(
            f"the torch reference needs torch and diffusers ({e})",
            fix="pip install 'iap-rt[export]' (install torch first).",
        ) from e
    load_start = time.perf_counter()
    ref = TorchReference(spec)

    def generate() -> RunTimes:
        generate.last_latents, times = ref()
        return times

    generate.load_start = load_start
    generate.last_latents = None
    generate.peak_gpu_mb = ref.peak_gpu_mb
    return generate, ref.device_name, lambda: None


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM; getrusage where /proc lacks it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _nvidia_smi_process_mb(pid: int) -> float | None:
    """GPU memory ``pid`` holds now (ORT's arena keeps its peak), via nvidia-smi."""
    out = _nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return None


def _nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


# ---- 3. the parent: run every backend, summarise ----------------------------------------------
def _child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    n = str(threads or os.cpu_count() or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = n
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "(no output)"


def _spawn_worker(spec: WorkerSpec, workdir: Path, threads: int | None) -> dict:
    """Run one worker subprocess; return its result or ``{"status": ..., "reason": ...}``."""
    spec_file = workdir / f"{spec.backend}.spec.json"
    out_file = workdir / f"{spec.backend}.result.json"
    spec_file.write_text(json.dumps(asdict(spec), ensure_ascii=False), "utf-8")
    cmd = [sys.executable, "-m", "iap_rt.benchmark", "worker", str(spec_file), str(out_file)]
    proc = subprocess.run(cmd, env=_child_env(threads), capture_output=True, text=True)
    if out_file.is_file():
        return json.loads(out_file.read_text("utf-8"))
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}"
        if proc.returncode == -9:
            why += " (out of memory?)"
    else:
        why = f"exit code {proc.returncode}: {_last_line(proc.stderr)}"
    return {"status": "error", "reason": why}


def _median_spread(values: list[float]) -> tuple[float, list[float]]:
    return statistics.median(values), [min(values), max(values)]


def summarise(raw: dict) -> dict:
    """A worker's raw runs -> the result entry (medians + spreads)."""
    runs = [RunTimes(**r) for r in raw["runs"]]
    per_run = {
        "text_encoder_s": [r.text_encoder_s for r in runs],
        "unet_step_s": [s for r in runs for s in r.unet_s],  # every step of every run
        "vae_decode_s": [r.vae_decode_s for r in runs],
        "overhead_step_s": [r.overhead_step_s for r in runs],
        "e2e_s": [r.e2e_s for r in runs],
    }
    entry = {"backend": raw["backend"], "device": raw["device"]}
    spread = {}
    for name, values in per_run.items():
        entry[name], spread[name] = _median_spread(values)
    # the mean shows the tail a median hides (a descheduled ORT thread on a busy machine)
    entry["unet_step_mean_s"] = statistics.fmean(per_run["unet_step_s"])
    cpu = [c for r in runs for c in r.unet_cpu_s]
    entry["unet_step_cpu_s"] = statistics.median(cpu) if cpu else None
    entry["cold_start_s"] = raw["cold_start_s"]
    entry["peak_rss_mb"] = raw["peak_rss_mb"]
    entry["peak_gpu_mb"] = raw.get("peak_gpu_mb")
    entry["overhead_pct_of_step"] = 100.0 * entry["overhead_step_s"] / entry["unet_step_s"]
    # an estimate, not a measurement: what one image would take at 50 steps
    entry["e2e_50_steps_est_s"] = (
        entry["text_encoder_s"]
        + 50 * (entry["unet_step_s"] + entry["overhead_step_s"])
        + entry["vae_decode_s"]
    )
    entry["spread"] = spread  # [min, max] over the measured runs (UNet: over all steps)
    entry["samples"] = {k: len(v) for k, v in per_run.items()}
    entry["load_s"] = raw["load_s"]
    entry["first_image_s"] = raw["first_image_s"]
    entry["import_s"] = raw["import_s"]
    entry["loadavg_before_after"] = raw.get("loadavg")
    entry["latents_absmax"] = raw.get("latents_absmax")  # final latents, last run
    for key in ("unet_graph", "cuda_graph"):
        if key in raw:
            entry[key] = raw[key]
    entry["runs"] = raw["runs"]  # the raw per-run timings the figures above come from
    return entry


def add_ratios(results: list[dict], latents: dict[str, np.ndarray]) -> None:
    """Each backend's speed-up over ``torch`` (torch time / backend time; > 1 is faster) and
    its final-latents max abs difference to ``torch``."""
    ref = next((r for r in results if r["backend"] == "torch"), None)
    for r in results:
        r["speedup_vs_torch"] = (
            {
                "unet_step": ref["unet_step_s"] / r["unet_step_s"],
                "e2e": ref["e2e_s"] / r["e2e_s"],
                "unet_step_cpu": (
                    ref["unet_step_cpu_s"] / r["unet_step_cpu_s"]
                    if ref.get("unet_step_cpu_s") and r.get("unet_step_cpu_s")
                    else None
                ),
            }
            if ref is not None
            else None
        )
        diff = None
        if ref is not None and r is not ref and {"torch", r["backend"]} <= set(latents):
            a, b = latents["torch"], latents[r["backend"]]
            if a.shape == b.shape:
                diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        r["latents_max_abs_diff_vs_torch"] = diff


def machine_info() -> dict:
    """CPU, cores, memory, GPU and library versions (no torch import)."""
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpus = []
    out = _nvidia_smi(
        ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]
    )
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_mb": parts[1], "driver": parts[2]})
    versions = {}
    for pkg in VERSION_PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        providers = []
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gb": mem_gb,
        "gpu": gpus or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "onnxruntime_providers": providers,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def resolve_size(cfg: BenchConfig, model_dir: Path) -> tuple[int, int]:
    from iap_rt.modeldir import ModelDir

    default = DEFAULT_SIZE.get(cfg.arch)
    if default is None or cfg.model is not None:
        default = int(ModelDir.open(model_dir).manifest.get("image_size", default or 512))
    return cfg.height or default, cfg.width or default


def run_bench(cfg: BenchConfig, command: str = "", log=print) -> dict:
    """Run every requested backend; return the result document (see the module docstring)."""
    from iap_rt.modeldir import ModelDir

    cfg.check()
    machine = machine_info()
    sources = prepare_sources(cfg, log=log)
    model = ModelDir.open(sources.model_dir)
    height, width = resolve_size(cfg, sources.model_dir)
    scheduler = cfg.scheduler or model.default_scheduler
    if scheduler not in DIFFUSERS_SCHEDULERS:
        raise ConfigError(
            f"unknown scheduler {scheduler!r}", fix=f"use one of {', '.join(DIFFUSERS_SCHEDULERS)}."
        )
    results, skipped, latents = [], [], {}
    with tempfile.TemporaryDirectory(prefix="iap-rt-bench-") as tmp:
        for backend in dict.fromkeys(cfg.backends):
            if backend.startswith("torch") and sources.torch_unavailable:
                skipped.append({"backend": backend, "reason": sources.torch_unavailable})
                log(f"{backend}: skipped ({sources.torch_unavailable})")
                continue
            spec = WorkerSpec(
                backend=backend,
                model_dir=str(sources.model_dir),
                base_dir=str(sources.base_dir) if sources.base_dir else None,
                encoder_dir=str(sources.encoder_dir) if sources.encoder_dir else None,
                height=height,
                width=width,
                steps=cfg.steps,
                batch_size=cfg.batch_size,
                guidance=float(cfg.guidance),
                scheduler=scheduler,
                seed=cfg.seed,
                repeat=cfg.repeat,
                warmup=cfg.warmup,
                threads=cfg.threads,
                device=cfg.device,
                latents_out=str(Path(tmp) / f"{backend}.latents.npy"),
                ort_unet=cfg.ort_unet,
            )
            log(f"{backend}: measuring ({cfg.warmup} warm-up + {cfg.repeat} runs) ...")
            raw = _spawn_worker(spec, Path(tmp), cfg.threads)
            if raw.get("status") in ("unavailable", "error"):
                skipped.append(
                    {"backend": backend, "reason": raw["reason"], "error": raw["status"] == "error"}
                )
                log(f"{backend}: {raw['status']} ({raw['reason']})")
                continue
            results.append(summarise(raw))
            if Path(spec.latents_out).is_file():
                latents[backend] = np.load(spec.latents_out)
    add_ratios(results, latents)
    machine["loadavg_end"] = _loadavg()
    do_cfg = cfg.guidance > 1.0
    config = {
        "arch": cfg.arch,
        "height": height,
        "width": width,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "repeat": cfg.repeat,
        "warmup": cfg.warmup,
        "guidance": float(cfg.guidance),
        "unet_batch": 2 * cfg.batch_size if do_cfg else cfg.batch_size,
        "scheduler": scheduler,
        "seed": cfg.seed,
        "threads": cfg.threads or os.cpu_count(),
        "device": cfg.device,
        "backends": list(cfg.backends),
        "model_id": model.model_id,
        "precision": {n: model.precision(n) for n in model.manifest["networks"]},
        "model_dir": str(sources.model_dir),
        "model_build_s": sources.build_s,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
    }
    return {
        "machine": machine,
        "config": config,
        "results": results,
        "skipped": skipped,
        "notes": _notes(cfg, sources),
        "command": command,
        "units": "seconds (medians over the measured runs); peak_rss_mb/peak_gpu_mb in MiB",
    }


def _notes(cfg: BenchConfig, sources: Sources) -> list[str]:
    notes = []
    if cfg.model is None and cfg.arch in ("tiny", "sd15"):
        notes.append(
            f"{cfg.arch}: the architecture from its configs with random seeded weights (latency "
            "does not depend on weight values), exported by the project's export stage."
        )
    if cfg.steps < 25:
        notes.append(
            f"e2e_s is one image at {cfg.steps} denoising steps, not a full 25-50 step image; "
            "e2e_50_steps_est_s extrapolates it (text encoder + 50 x (UNet step + overhead) + "
            "VAE decode)."
        )
    notes.append(
        "backends ran one after the other, each in its own subprocess; on a shared machine "
        "compare loadavg_before_after, and unet_step_cpu_s (process CPU time, robust to other "
        "processes taking the cores) beside the wall times."
    )
    return notes


def check_document(doc: dict) -> list[str]:
    """Problems with a result document's layout (empty list: it is well formed)."""
    problems = []
    for key in ("machine", "config", "results"):
        if key not in doc:
            problems.append(f"missing top-level key {key!r}")
    for key in CONFIG_FIELDS:
        if key not in doc.get("config", {}):
            problems.append(f"config lacks {key!r}")
    for r in doc.get("results", []):
        for key in RESULT_FIELDS:
            if key not in r:
                problems.append(f"result {r.get('backend')} lacks {key!r}")
            elif key not in ("backend", "device"):
                v = r[key]
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    problems.append(f"result {r.get('backend')}: {key} = {v!r} is not > 0")
    return problems


def format_table(doc: dict) -> str:
    """The results side by side, with speed-ups over torch."""
    cols = [
        ("backend", "backend", "{}"),
        ("device", "device", "{}"),
        ("text_encoder_s", "text enc", "{:.4g}"),
        ("unet_step_s", "UNet/step", "{:.4g}"),
        ("vae_decode_s", "VAE", "{:.4g}"),
        ("overhead_step_s", "ovh/step", "{:.3g}"),
        ("e2e_s", "e2e", "{:.4g}"),
        ("cold_start_s", "cold", "{:.4g}"),
        ("peak_rss_mb", "RSS MiB", "{:.0f}"),
    ]
    header = [c[1] for c in cols] + ["UNet x torch", "e2e x torch", "UNet CPU-time x"]
    rows = [header]
    for r in doc["results"]:
        row = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols]
        row[1] = row[1].split(" (")[0]
        s = r.get("speedup_vs_torch")
        row += [f"{s['unet_step']:.2f}x", f"{s['e2e']:.2f}x"] if s else ["-", "-"]
        cpu = s.get("unet_step_cpu") if s else None
        row.append(f"{cpu:.2f}x" if cpu else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    c = doc["config"]
    title = (
        f"{c['arch']} {c['height']}x{c['width']}, {c['steps']} steps, batch {c['batch_size']} "
        f"(UNet batch {c['unet_batch']}), {c['scheduler']}, {c['repeat']} runs; seconds (medians); "
        "x torch = torch time / backend time"
    )
    lines = [title, *lines]
    for s in doc.get("skipped", []):
        lines.append(f"{s['backend']}: not run: {s['reason']}")
    return "\n".join(lines)


# ---- subprocess entry points -----------------------------------------------------------------
def _worker_main(spec_file: str, out_file: str) -> int:
    from iap_rt.fileio import write_json_atomic

    spec = WorkerSpec(**json.loads(Path(spec_file).read_text("utf-8")))
    try:
        result = run_worker(spec)
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


def _main(argv: list[str]) -> int:
    if argv[:1] == ["worker"] and len(argv) == 3:
        return _worker_main(argv[1], argv[2])
    if argv[:1] == ["build"] and len(argv) in (4, 5):
        if len(argv) == 5:
            import torch

            torch.set_num_threads(int(argv[4]))
        build_arch(argv[1], argv[2], argv[3])
        return 0
    print("usage: python -m iap_rt.benchmark worker SPEC OUT | build ARCH ROOT PRECISION [T]")
    return 2


__all__ = [
    "ARCHES",
    "BACKENDS",
    "RESULT_FIELDS",
    "BenchConfig",
    "check_document",
    "format_table",
    "machine_info",
    "run_bench",
]

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
