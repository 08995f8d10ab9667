"""The torch-free text-to-image pipeline.

tokenizer -> text encoder -> denoising loop with classifier-free guidance -> VAE decode ->
uint8 images, on any backend (ONNX Runtime, TensorRT). Modelled on diffusers'
``StableDiffusionPipeline``: :meth:`Pipeline.check_inputs` validates everything up front;
:meth:`Pipeline.__call__` reads as numbered steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from iap_rt.errors import ConfigError, InputError
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.schedulers import SCHEDULERS, SchedulerConfig, make_scheduler
from iap_rt.specs import axis_values
from iap_rt.tokenizer import PromptTokenizer

MAX_STEPS = 1000


def initial_noise(seed: int, batch_size: int, shape: tuple[int, ...]) -> np.ndarray:
    """(B, C, h, w) float32 N(0, 1) noise; image i uses its own generator seeded ``seed + i``,
    so image i of a batch equals the same ``seed + i`` generated alone."""
    return np.stack(
        [
            np.random.default_rng(seed + i).standard_normal(shape, dtype=np.float32)
            for i in range(batch_size)
        ]
    )


@dataclass
class Timings:
    text_encoder_s: float = 0.0
    unet_s: list[float] = field(default_factory=list)  # per step, network time only
    loop_s: float = 0.0  # whole denoising loop (network + scheduler + copies + Python)
    vae_decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def overhead_step_s(self) -> float:
        n = max(1, len(self.unet_s))
        return max(0.0, self.loop_s - sum(self.unet_s)) / n


@dataclass
class GenerationResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    latents: np.ndarray  # (B, C, h, w) float32, final latents before VAE scaling
    seeds: list[int]
    params: dict
    timings: Timings


class Pipeline:
    """Chinese text-to-image on a model directory.

    >>> pipe = Pipeline.from_dir("model/")            # doctest: +SKIP
    >>> pipe("山水画", steps=25, seed=1).images.shape  # doctest: +SKIP
    (1, 512, 512, 3)
    """

    def __init__(self, model: ModelDir, backend, progress: bool = True):
        self.model = model
        self.backend = backend
        self._runners = None
        self.tokenizer = PromptTokenizer.from_dir(model.tokenizer_dir)
        self.scheduler_config = SchedulerConfig.from_dict(model.scheduler_config())
        self.dims = model.dims
        self.progress = progress
        self._embed_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike | None = None, backend: str = "auto", progress: bool = True
    ) -> Pipeline:
        """Open ``path`` (default: the embedded model) on ``backend`` (auto, ort, trt)."""
        from iap_rt.backends import get_backend

        model = ModelDir.open(path or default_model_dir())
        return cls(model, get_backend(backend, model), progress=progress)

    @property
    def runners(self) -> dict:
        """The backend's network runners, loaded on first use (sessions/engines)."""
        if self._runners is None:
            self._runners = self.backend.load(self.model)
        return self._runners

    @property
    def default_size(self) -> int:
        return int(self.model.manifest.get("image_size", 512))

    # ---- 0. validation ------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        steps,
        guidance,
        seed,
        height,
        width,
        batch_size,
        scheduler,
    ) -> None:
        """Raise :class:`InputError`/:class:`ConfigError` naming the rule and the value."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(negative_prompt, str):
            raise InputError(
                f"negative prompt must be a string, got {type(negative_prompt).__name__}"
            )
        f = self.dims.pixel_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % f:
                raise InputError(
                    f"{name} must be a positive multiple of {f}, got {v!r}",
                    fix=f"use e.g. --{name} {max(f, (int(v) // f) * f if isinstance(v, int) else 512)} "
                    f"(the UNet halves the latents {self.dims.unet_downsamples} "
                    f"times; the VAE scales by {self.dims.vae_scale_factor}).",
                )
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
            raise InputError(
                f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}",
                fix="use e.g. --steps 25.",
            )
        if steps > self.scheduler_config.num_train_timesteps:
            raise InputError(
                f"steps {steps} exceeds the model's {self.scheduler_config.num_train_timesteps} "
                "training timesteps"
            )
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
            raise InputError(
                f"guidance must be a number >= 0, got {guidance!r}",
                fix="use e.g. --guidance 7.5 (<= 1 turns classifier-free guidance off).",
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise InputError(f"seed must be an integer from 0 to 2**63-1, got {seed!r}")
        if scheduler not in SCHEDULERS:
            raise ConfigError(
                f"unknown scheduler {scheduler!r}", fix=f"use one of {', '.join(SCHEDULERS)}."
            )

    def clear_cache(self) -> None:
        """Forget cached prompt embeddings (the next call runs the text encoder again)."""
        self._embed_cache.clear()

    # ---- 1. text --------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> (N, S, D) embeddings in the text encoder's precision (cached)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if todo:
            enc = self.tokenizer(todo)
            out = self.runners["text_encoder"].run(
                {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
            )["text_embeddings"]
            for p, e in zip(todo, out):
                self._embed_cache[p] = e
        return np.stack([self._embed_cache[p] for p in prompts])

    # ---- the whole generation ----------------------------------------------------------
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 1,
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
    ) -> GenerationResult:
        """Generate ``batch_size`` images for ``prompt``; image i uses seed ``seed + i``."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        scheduler = scheduler or self.model.default_scheduler
        self.check_inputs(
            prompt, negative_prompt, steps, guidance, seed, height, width, batch_size, scheduler
        )
        t_start = time.perf_counter()
        timings = Timings()
        do_cfg = guidance > 1.0
        dims = self.dims
        ax = axis_values(batch_size, height, width, do_cfg, dims)
        unet_dtype = np.float16 if self.model.precision("unet") == "fp16" else np.float32
        vae_dtype = np.float16 if self.model.precision("vae_decoder") == "fp16" else np.float32

        # 1. encode prompt (+ negative prompt under guidance): UNet batch N = 2B or B
        t0 = time.perf_counter()
        texts = [prompt] if not do_cfg else [negative_prompt, prompt]
        emb = self.encode(texts).astype(unet_dtype)  # (1 or 2, S, D)
        emb = np.repeat(emb, batch_size, axis=0)  # (N, S, D): [neg]*B + [pos]*B
        timings.text_encoder_s = time.perf_counter() - t0

        # 2. scheduler and initial noise
        sched = make_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(steps)
        shape = (dims.latent_channels, ax["h"], ax["w"])
        if latents is None:
            latents = initial_noise(seed, batch_size, shape)
        latents = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)  # (B, C, h, w)

        # 3. denoising loop
        unet = self.runners["unet"]
        t_loop = time.perf_counter()
        for t in _progress(sched.timesteps, self.progress, "denoising"):
            x = np.concatenate([latents, latents]) if do_cfg else latents  # (N, C, h, w)
            x = sched.scale_model_input(x, t).astype(unet_dtype, copy=False)
            ts = np.full((ax["N"],), sched.timestep_input(t), dtype=np.float32)
            t0 = time.perf_counter()
            noise = unet.run({"sample": x, "timestep": ts, "encoder_hidden_states": emb})[
                "noise_pred"
            ].astype(np.float32, copy=False)  # (N, C, h, w)
            timings.unet_s.append(time.perf_counter() - t0)
            if do_cfg:
                uncond, cond = noise[:batch_size], noise[batch_size:]
                noise = uncond + np.float32(guidance) * (cond - uncond)  # (B, C, h, w)
            latents = sched.step(noise, t, latents).astype(np.float32, copy=False)
        timings.loop_s = time.perf_counter() - t_loop

        # 4. VAE decode -> uint8 (B, H, W, 3)
        t0 = time.perf_counter()
        z = (latents / np.float32(self.model.vae_scaling_factor)).astype(vae_dtype)
        image = self.runners["vae_decoder"].run({"latent_sample": z})["image"]
        timings.vae_decode_s = time.perf_counter() - t0
        images = to_uint8(image)
        timings.total_s = time.perf_counter() - t_start
        params = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance": float(guidance),
            "scheduler": scheduler,
            "height": height,
            "width": width,
            "model_id": self.model.model_id,
            "backend": f"{self.backend.name}:{self.backend.device}",
        }
        seeds = [seed + i for i in range(batch_size)]
        return GenerationResult(images, latents, seeds, params, timings)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (diffusers' postprocess)."""
    x = np.clip(image.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="step", leave=False)
