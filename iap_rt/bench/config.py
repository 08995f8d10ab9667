"""``BenchConfig``: one ``iap-rt bench`` invocation (the command's options), and its constants."""

from __future__ import annotations

from dataclasses import dataclass

from iap_rt.errors import ConfigError

ARCHES = ("tiny", "toy", "sd15")
BACKENDS = ("torch", "torch-compile", "ort", "ort-graph", "trt")
TORCH_BACKENDS = ("torch", "torch-compile")  # run by iap_rt.train.bench_torch
DEVICES = ("auto", "cpu", "cuda")
ORT_UNET_GRAPHS = ("fused", "exported")
PROMPT = "一幅山水画，远处是高山，近处有一条小船"
NEGATIVE_PROMPT = "模糊，低质量"
DEFAULT_SIZE = {"tiny": 64, "sd15": 512}  # image side; toy: the model's own size
BUILD_SEED = 0
CACHE_LAYOUT = 1  # bump when what the cache holds changes


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
    fp16_vae: bool = False  # with fp16: the VAE decoder in fp16 too (torch matches the model's)
    ort_unet: str = "fused"  # ort backends: the fused-attention UNet graph, or "exported"
    model: str | None = None  # an existing model directory instead of the cache
    base: str | None = None  # diffusers base for the torch reference (with --model)
    encoder: str | None = None  # chinese_encoder/ for the torch reference (with --model)
    cache_dir: str | None = None  # default ~/.cache/iap-rt/bench
    # seconds each backend's worker may take (load, warm-up and runs) before it is killed:
    # "600" for all, "torch=900,ort=300" per backend, or both ("torch=900,600"); None: no limit
    timeout: str | None = None

    def timeout_for(self, backend: str) -> float | None:
        """The time limit of ``backend``'s worker (None: none)."""
        default, per = None, {}
        for item in (self.timeout or "").split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = item.rpartition("=")
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if seconds <= 0 or (sep and name not in BACKENDS):
                raise ConfigError(
                    f"--timeout item {item!r} is not SECONDS or BACKEND=SECONDS",
                    fix=f"e.g. --timeout 600 or --timeout torch=900,ort=300 (backends: "
                    f"{', '.join(BACKENDS)}; seconds > 0).",
                )
            if sep:
                per[name] = seconds
            else:
                default = seconds
        return per.get(backend, default)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option and its valid values."""
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
                flag = f"--{name.replace('_', '-')}"
                raise ConfigError(f"{flag} must be >= 1, got {v!r}", fix=f"pass e.g. {flag} 1.")
        if self.fp16_vae and not self.fp16:
            raise ConfigError(
                "--fp16-vae makes the VAE decoder of an fp16 export fp16 too",
                fix="pass --fp16 with it (or drop --fp16-vae).",
            )
        for backend in self.backends:
            self.timeout_for(backend)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"--threads must be >= 1, got {self.threads}",
                fix="pass e.g. --threads 1, or drop it to use every core.",
            )
        if self.model is None and (self.base or self.encoder):
            raise ConfigError(
                "--base/--encoder name the torch reference's sources of a --model directory",
                fix="pass --model too, or drop --base/--encoder to use the built cache.",
            )
