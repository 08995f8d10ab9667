"""The one PyTorch twin of the runtime pipeline, and the one diffusers scheduler mapping.

:class:`TorchPipeline` runs the algorithm of :class:`iap_rt.pipeline.Pipeline` with diffusers
components in torch: tokenizer -> Chinese encoder -> denoising loop with classifier-free
guidance (diffusers' scheduler of the same name, configured from the same
``scheduler.json``, see :func:`diffusers_scheduler`) -> VAE decode -> uint8, from the same
initial noise (:func:`iap_rt.pipeline.initial_noise`), so its final latents match the
runtime's. Its users:

- ``iap-rt bench``'s torch worker (:mod:`iap_rt.train.bench_torch`) times it phase by phase
  (:class:`TorchTimings`, the runtime's ``Timings`` + UNet CPU time; CUDA is synchronised
  around every timed call) and runs it in fp16 on CUDA;
- the runtime parity test (``tests/integration/test_pipeline_parity.py``) calls it whole;
- the toy evaluation (:func:`iap_rt.train.toy.evaluate.diffusers_generator`) brings its own
  embeddings (the English CLIP text model, ``""`` as the unconditional prompt) and noise,
  batches prompts, and calls :meth:`TorchPipeline.denoise` and :meth:`TorchPipeline.decode`.

Ported from the three loops it replaces (``iap_rt/benchmark.py``'s ``TorchReference``, the
parity test's ``reference_loop`` and ``toy/evaluate.py``'s DDIM loop), operation for
operation, so that none of their results changed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from iap_rt.errors import ConfigError, InputError
from iap_rt.pipeline import Timings, initial_noise, to_uint8

# the diffusers scheduler that runs each of the runtime's schedulers (iap_rt.schedulers):
# class name and the settings it needs beyond the model's scheduler.json
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def diffusers_scheduler(name: str, config: dict):
    """diffusers' scheduler for the runtime's scheduler ``name``, configured from ``config``
    (a model directory's ``scheduler.json``: diffusers field names)."""
    import diffusers

    if name not in DIFFUSERS_SCHEDULERS:
        raise ConfigError(
            f"unknown scheduler {name!r}", fix=f"use one of {', '.join(DIFFUSERS_SCHEDULERS)}."
        )
    cls_name, extra = DIFFUSERS_SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    sched = cls.from_config(config)
    return cls.from_config(sched.config, **extra) if extra else sched


@dataclass
class TorchTimings(Timings):
    """The runtime's :class:`~iap_rt.pipeline.Timings` + the process CPU time per UNet call."""

    unet_cpu_s: list[float] = field(default_factory=list)


@dataclass
class TorchResult:
    """One :meth:`TorchPipeline.__call__`: what the runtime's ``GenerationResult`` holds."""

    images: np.ndarray  # (B, H, W, 3) uint8
    latents: np.ndarray  # (B, C, h, w) float32, final latents before VAE scaling
    decoded: np.ndarray  # (B, 3, H, W) float32, the VAE's output before to_uint8
    timings: TorchTimings


class TorchPipeline:
    """Text-to-image with diffusers' UNet/VAE/schedulers and our encoder, in torch.

    ``encoder`` and ``tokenizer`` are needed by :meth:`__call__` and :meth:`encode` only;
    :meth:`denoise` and :meth:`decode` take embeddings and latents from anywhere. The UNet
    runs in ``dtype`` (fp16 on CUDA for the bench), the VAE in ``vae_dtype`` (default
    ``dtype``; the bench matches the model directory's VAE precision); latents, the scheduler
    and the guidance combination stay float32, as in the runtime.
    """

    def __init__(
        self,
        unet,
        vae,
        scheduler_config: dict,
        encoder=None,
        tokenizer=None,
        default_scheduler: str = "dpm++",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
    ):
        self.unet, self.vae, self.encoder, self.tokenizer = unet, vae, encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.default_scheduler = default_scheduler
        self.dtype = dtype
        self.vae_dtype = vae_dtype or dtype
        self.device = next(unet.parameters()).device
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_dirs(
        cls,
        model_dir: str | os.PathLike,
        base_dir: str | os.PathLike,
        encoder_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
    ) -> TorchPipeline:
        """The PyTorch sources of an exported model directory: UNet and VAE from the diffusers
        ``base_dir``, our encoder from ``encoder_dir``; tokenizer, scheduler config and default
        scheduler from ``model_dir`` (what the runtime reads)."""
        from pathlib import Path

        from diffusers import AutoencoderKL, UNet2DConditionModel

        from iap_rt.modeldir import ModelDir
        from iap_rt.tokenizer import PromptTokenizer
        from iap_rt.train.encoder import ChineseTextEncoder

        model = ModelDir.open(model_dir)
        base = Path(base_dir)
        kw = {"use_safetensors": True, "torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(base / "unet", **kw).to(device).eval()
        vae_kw = {**kw, "torch_dtype": vae_dtype or dtype}
        vae = AutoencoderKL.from_pretrained(base / "vae", **vae_kw).to(device).eval()
        encoder = ChineseTextEncoder.load(encoder_dir).to(device, dtype).eval()
        return cls(
            unet,
            vae,
            model.scheduler_config(),
            encoder=encoder,
            tokenizer=PromptTokenizer.from_dir(model.tokenizer_dir),
            default_scheduler=model.default_scheduler,
            dtype=dtype,
            vae_dtype=vae_dtype,
        )

    def sync(self) -> None:
        """Wait for the GPU (timings of CUDA work need it); nothing on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- 1. text --------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (N, S, D) embeddings in ``dtype`` (tokenizer + our encoder)."""
        if self.encoder is None or self.tokenizer is None:
            raise ConfigError(
                "this TorchPipeline has no text encoder",
                fix="build it with TorchPipeline.from_dirs, or pass embeddings to denoise().",
            )
        tok = self.tokenizer(prompts)
        ids = torch.from_numpy(tok.input_ids).to(self.device)
        mask = torch.from_numpy(tok.attention_mask).to(self.device)
        return self.encoder(ids, mask).to(self.dtype)

    # ---- 2.+3. scheduler and denoising loop ----------------------------------------------------
    @torch.inference_mode()
    def denoise(
        self,
        emb: torch.Tensor,
        noise: np.ndarray | torch.Tensor,
        steps: int,
        guidance: float,
        scheduler: str,
        timings: TorchTimings | None = None,
    ) -> torch.Tensor:
        """The denoising loop from ``noise`` (B, C, h, w) N(0, 1); returns float32 latents.

        ``emb``: (2B, S, D) ``[uncond]*B + [cond]*B`` for classifier-free guidance with scale
        ``guidance``, or (B, S, D) for no guidance (``guidance`` is then unused). UNet time
        (wall and process CPU) per step and the loop time go to ``timings``.
        """
        timings = timings if timings is not None else TorchTimings()
        latents = torch.as_tensor(noise).to(self.device)  # (B, C, h, w)
        b = latents.shape[0]
        if emb.shape[0] not in (b, 2 * b):
            raise InputError(
                f"embeddings batch {emb.shape[0]} fits neither B={b} nor 2B={2 * b} latents",
                fix="pass [uncond]*B + [cond]*B embeddings for guidance, or B without it.",
            )
        do_cfg = emb.shape[0] == 2 * b
        sched = diffusers_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)  # as diffusers' pipeline does
        latents = latents * sched.init_noise_sigma  # (B, C, h, w)
        t_loop = time.perf_counter()
        for t in sched.timesteps:
            x = torch.cat([latents, latents]) if do_cfg else latents  # (N, C, h, w)
            x = sched.scale_model_input(x, t).to(self.dtype)
            self.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            eps = self.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
            self.sync()
            timings.unet_s.append(time.perf_counter() - t0)
            timings.unet_cpu_s.append(time.process_time() - c0)
            eps = eps.float()  # (N, C, h, w)
            if do_cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)  # (B, C, h, w)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
        self.sync()
        timings.loop_s = time.perf_counter() - t_loop
        return latents

    # ---- 4. VAE decode ---------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (B, C, h, w) -> the VAE's images (B, 3, H, W), about [-1, 1]."""
        z = (latents / self.scaling_factor).to(self.vae_dtype)
        return self.vae.decode(z, return_dict=False)[0]

    # ---- the whole generation --------------------------------------------------------------
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
    ) -> TorchResult:
        """Generate ``batch_size`` images for ``prompt`` as :class:`iap_rt.pipeline.Pipeline`
        does (same arguments, same initial noise per seed)."""
        scheduler = scheduler or self.default_scheduler
        side = int(self.unet.config.sample_size) * self.vae_scale
        height, width = height or side, width or side
        t_start = time.perf_counter()
        timings = TorchTimings()
        do_cfg = guidance > 1.0

        # 1. encode prompt (+ negative prompt under guidance): UNet batch N = 2B or B
        t0 = time.perf_counter()
        emb = self.encode([negative_prompt, prompt] if do_cfg else [prompt])
        emb = emb.repeat_interleave(batch_size, dim=0)  # (N, S, D): [neg]*B + [pos]*B
        self.sync()
        timings.text_encoder_s = time.perf_counter() - t0

        # 2. + 3. the runtime's initial noise, scheduler and denoising loop
        if latents is None:
            f = self.vae_scale
            shape = (self.latent_channels, height // f, width // f)
            latents = initial_noise(seed, batch_size, shape)  # (B, C, h, w)
        final = self.denoise(emb, latents, steps, guidance, scheduler, timings)

        # 4. VAE decode -> uint8 (B, H, W, 3)
        t0 = time.perf_counter()
        image = self.decode(final)
        self.sync()
        timings.vae_decode_s = time.perf_counter() - t0
        decoded = image.float().cpu().numpy()
        images = to_uint8(decoded)
        final = final.float().cpu().numpy()
        timings.total_s = time.perf_counter() - t_start
        return TorchResult(images, final, decoded, timings)
