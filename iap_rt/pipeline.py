"""The torch-free text-to-image pipeline.

tokenizer -> text encoder -> denoising loop with classifier-free guidance -> VAE decode ->
uint8 images, on any backend (ONNX Runtime, TensorRT). Modelled on diffusers'
``StableDiffusionPipeline``: every request is resolved and checked once, up front, by
:mod:`iap_rt.requests` (the one owner of what a request means); :meth:`Pipeline.generate`
trusts what it returns and reads as numbered steps.

One call can serve several prompts (:class:`PromptRequest`), each with its own negative prompt,
seed(s) and guidance scale, in one UNet batch: what a server does with queued requests that
share steps, size and scheduler. The UNet batch is laid out as ``[uncond rows of the images with
guidance] + [cond rows of every image]``; every image is computed exactly as it would be alone
(the networks treat batch rows independently), so image i of a call equals the same prompt and
seed generated alone, byte for byte. Calls with more images than ``chunk_size`` run as several
UNet batches one after the other, which bounds the memory a call needs; before allocating
anything a call's peak memory is estimated and a call above ``memory_limit`` is refused
(:mod:`iap_rt.memory`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from iap_rt import editing, memory
from iap_rt.errors import ArtifactNotFoundError, ConfigError, InputError
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.requests import PromptRequest, ResolvedRequest, resolve
from iap_rt.schedulers import SchedulerConfig, make_scheduler
from iap_rt.tokenizer import PromptTokenizer

DEFAULT_CHUNK = 8  # images per UNet batch (the UNet runs 2x this under guidance)


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
    """Where a call's time went. ``load_s``: sessions/engines created by this call (the first
    call of a pipeline), kept apart from the text encoder's own time."""

    load_s: float = 0.0
    vae_encode_s: float = 0.0  # edits: the input images through the VAE encoder
    text_encoder_s: float = 0.0
    unet_s: list[float] = field(default_factory=list)  # per step (and chunk), network time only
    loop_s: float = 0.0  # whole denoising loop (network + scheduler + copies + Python)
    vae_decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def overhead_step_s(self) -> float:
        n = max(1, len(self.unet_s))
        return max(0.0, self.loop_s - sum(self.unet_s)) / n

    def as_dict(self) -> dict:
        """Seconds, rounded to the microsecond (``--json``'s ``timings``)."""
        r = lambda x: round(x, 6)  # noqa: E731
        return {"load_s": r(self.load_s), "vae_encode_s": r(self.vae_encode_s),
                "text_encoder_s": r(self.text_encoder_s),
                "unet_steps": len(self.unet_s), "unet_s": r(sum(self.unet_s)),
                "unet_step_median_s": r(statistics.median(self.unet_s)) if self.unet_s else None,
                "loop_s": r(self.loop_s), "vae_decode_s": r(self.vae_decode_s),
                "total_s": r(self.total_s)}  # fmt: skip


@dataclass
class GenerationResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    latents: np.ndarray  # (B, C, h, w) float32, final latents before VAE scaling
    seeds: list[int]
    params: dict
    timings: Timings  # of the whole call (shared by the results of a multi-prompt call)
    notice: str | None = None  # the model's word on a prompt outside what it knows


@dataclass
class _Image:
    """One image of a call: which request, its seed, texts, guidance and initial noise."""

    request: int
    seed: int
    prompt: str
    negative_prompt: str
    guidance: float
    noise: np.ndarray  # (C, h, w) float32, N(0, 1)
    start: int = 0  # the schedule index it joins the loop at (edits: > 0 below strength 1)
    init: np.ndarray | None = None  # (C, h, w) the edited image's latents, scaled
    mask: np.ndarray | None = None  # (1, h, w) in {0, 1}: latent blending, 1 = repaint
    cond: np.ndarray | None = None  # (C + 1, h, w): an inpainting UNet's mask + masked latents

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    @property
    def from_noise(self) -> bool:
        """Starts from pure noise: a generation, or inpainting at strength 1 (diffusers); image
        to image always starts from its noised image (an inpainting UNet inpaints every edit)."""
        inpaint = self.mask is not None or self.cond is not None
        return self.init is None or (inpaint and self.start == 0)


@dataclass
class _Edit:
    """What the VAE encoder made of one request, per image of it."""

    init: np.ndarray | None = None  # (n, C, h, w) the image's latents, scaled (edits)
    mask: np.ndarray | None = None  # (1, h, w) latent blending's mask (4-channel UNets)
    cond: np.ndarray | None = None  # (n, C + 1, h, w) an inpainting UNet's extra channels


class Pipeline:
    """Chinese text-to-image on a model directory.

    >>> pipe = Pipeline.from_dir("model/")            # doctest: +SKIP
    >>> pipe("山水画", steps=25, seed=1).images.shape  # doctest: +SKIP
    (1, 512, 512, 3)

    ``chunk_size``: at most this many images share one UNet batch; larger calls run in chunks.
    ``memory_limit``: refuse a call whose estimated peak exceeds it: ``"auto"`` (90% of the
    memory this process can reach), bytes, a size like ``"12GB"``, or ``"off"``.
    """

    def __init__(
        self,
        model: ModelDir,
        backend,
        progress: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        memory_limit: int | float | str | None = "auto",
    ):
        if not _is_int(chunk_size) or chunk_size < 1:
            raise ConfigError(
                f"chunk size must be an integer >= 1, got {chunk_size!r}",
                fix=f"use e.g. --chunk-size {DEFAULT_CHUNK} (images per UNet batch).",
            )
        self.memory_limit = memory.parse_limit(memory_limit)
        self._held: dict[str, float] = {}  # pool -> the largest estimate run so far (GPU)
        self.model = model
        self.backend = backend
        self._runners = None
        self.tokenizer = PromptTokenizer.from_dir(model.tokenizer_dir)
        self.scheduler_config = SchedulerConfig.from_dict(model.scheduler_config())
        self.dims = model.dims
        self.progress = progress
        self.chunk_size = int(chunk_size)
        self._embed_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike | None = None, backend: str = "auto", **options
    ) -> Pipeline:
        """Open ``path`` (default: the embedded model) on ``backend`` (auto, ort, trt);
        ``options``: progress, chunk_size, memory_limit."""
        from iap_rt.backends import get_backend

        model = ModelDir.open(path or default_model_dir())
        return cls(model, get_backend(backend, model), **options)

    @property
    def runners(self) -> dict:
        """The backend's network runners, loaded on first use (sessions/engines)."""
        if self._runners is None:
            self._runners = self.backend.load(self.model)
        return self._runners

    def runner(self, name: str):
        """The runner of ``name``, loading an optional network (the VAE encoder of image
        editing) on first use; a model without it is refused with the command that adds it."""
        runners = self.runners
        if name not in runners:
            if not self.model.has(name):
                raise ArtifactNotFoundError(
                    f"the model {self.model.path} has no {name} network (made before image "
                    "editing, or exported without it)",
                    fix=self.model.add_network_fix(name),
                )
            if self.backend.name == "trt":
                raise ArtifactNotFoundError(
                    f"no TensorRT engine for {name} in {self.model.path}",
                    fix=f"iap-rt engines build --model {self.model.path} --networks {name}",
                )
            runners.update(self.backend.load(self.model, (name,)))
        return runners[name]

    def estimate_memory(self, call: memory.Call) -> list[memory.Estimate]:
        """The estimated peak of ``call`` per memory pool on this model and backend."""
        return memory.estimate(
            self.model,
            self.backend.name,
            str(self.backend.device),
            bool(getattr(self.backend, "fused_unet", False)),
            call,
        )

    def check_memory(self, call: memory.Call) -> list[memory.Estimate]:
        """Refuse ``call`` (:class:`~iap_rt.errors.ResourceError`, with the number and the
        fix) when its estimated peak exceeds ``memory_limit``; return the estimates."""
        estimates = memory.guard(
            self.estimate_memory, call, self.memory_limit, self._held if self._runners else {},
            self.model.default_size, self.dims.pixel_multiple,
        )  # fmt: skip
        for e in estimates:
            self._held[e.pool] = max(self._held.get(e.pool, 0.0), e.total)
        return estimates

    def plan_call(self, requests: Sequence[ResolvedRequest]) -> memory.Call:
        """The :class:`~iap_rt.memory.Call` of resolved ``requests`` (which share one size):
        its images, the largest chunk and (at most) how many of that chunk's images are
        guided."""
        images = sum(r.batch_size for r in requests)
        guided = sum(r.batch_size for r in requests if r.guided)
        chunk = min(self.chunk_size, images)
        return memory.Call(images, chunk, min(chunk, guided), requests[0].height, requests[0].width)

    def resolve(self, request: PromptRequest | ResolvedRequest) -> ResolvedRequest:
        """``request`` against this pipeline's model (a resolved one is returned as it is)."""
        if isinstance(request, ResolvedRequest):
            return request
        return resolve(self.model, request)

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
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 1,
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
    ) -> GenerationResult:
        """Generate ``batch_size`` images for ``prompt``; image i uses seed ``seed + i``;
        what is None is the model's default (:mod:`iap_rt.requests`)."""
        request = PromptRequest(prompt, negative_prompt, seed, guidance, batch_size, latents,
                                steps, height, width, scheduler)  # fmt: skip
        return self.generate([request])[0]

    def generate(
        self,
        requests: Sequence[PromptRequest | ResolvedRequest],
        steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
    ) -> list[GenerationResult]:
        """Generate every request's images in shared UNet batches; one result per request.

        A :class:`PromptRequest` is resolved against the model first (``steps``, ``height``,
        ``width``, ``scheduler`` given here fill what it leaves unset); a
        :class:`ResolvedRequest` is trusted as it is. The requests must share steps, size and
        scheduler. Each image equals the same request generated alone."""
        if not requests:
            raise InputError("no prompt given", fix="pass at least one PromptRequest.")
        call = {"steps": steps, "height": height, "width": width, "scheduler": scheduler}
        call = {k: v for k, v in call.items() if v is not None}
        todo = [
            r if isinstance(r, ResolvedRequest) else replace(
                r, **{k: v for k, v in call.items() if getattr(r, k) is None})
            for r in requests
        ]  # fmt: skip
        todo = [self.resolve(r) for r in todo]
        keys = {r.call_key for r in todo}
        if len(keys) > 1:
            raise InputError(
                f"the requests of one call must share steps, scheduler and size; got "
                f"{sorted(keys)}",
                fix="split them into one call per (steps, scheduler, height, width).",
            )
        steps, scheduler, height, width = keys.pop()
        self.check_memory(self.plan_call(todo))  # before any allocation
        t_start = time.perf_counter()
        timings = Timings()
        shape = (self.dims.latent_channels, *_latent_hw(height, width, self.dims))
        # 0. sessions/engines, created on the first call (timed apart from the networks);
        # edits: the images through the VAE encoder
        if self._runners is None:
            t0 = time.perf_counter()
            self.runners  # noqa: B018
            timings.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        edits = self._encode_edits(todo)  # request -> _Edit
        timings.vae_encode_s = time.perf_counter() - t0
        images = _flatten(todo, shape, edits)
        chunks = [images[i : i + self.chunk_size] for i in range(0, len(images), self.chunk_size)]
        bar = _progress(steps * len(chunks), self.progress, "denoising")

        # 1. encode every prompt (+ negative prompts of guided images) once
        t0 = time.perf_counter()
        self.encode(
            [im.negative_prompt for im in images if im.guided] + [im.prompt for im in images]
        )
        timings.text_encoder_s = time.perf_counter() - t0

        # 2.-4. per chunk: denoising loop, then VAE decode
        latents, pixels = [], []
        for chunk in chunks:
            z = self._denoise(chunk, steps, scheduler, timings, bar)
            latents.append(z)
            t0 = time.perf_counter()
            pixels.append(self._decode(z))
            timings.vae_decode_s += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        latents_all, images_all = np.concatenate(latents), np.concatenate(pixels)
        timings.total_s = time.perf_counter() - t_start

        # 5. one result per request
        results, start = [], 0
        backend = f"{self.backend.name}:{self.backend.device}"
        for r in todo:
            end = start + r.batch_size
            params = r.params() | {"model_id": self.model.model_id, "backend": backend}
            seeds = [r.seed + i for i in range(r.batch_size)]
            pixels = images_all[start:end]
            if r.mask is not None:  # the kept pixels are the input's own
                pixels = editing.composite(pixels, r.image, r.mask, r.mask_blur)
            results.append(
                GenerationResult(pixels, latents_all[start:end], seeds, params, timings,
                                 notice=r.notice)
            )  # fmt: skip
            start = end
        return results

    def _encode_edits(self, requests) -> dict[int, _Edit]:
        """Each edit request's init latents (n, C, h, w), sampled per image seed from the VAE
        encoder's distribution and scaled, and its mask in latent space; with an inpainting
        UNet, every request's extra UNet channels (mask + masked-image latents: a generation
        is an inpainting of everything), and no latent blending."""
        out, blank = {}, None  # blank: the all-repaint masked image's latent distribution
        inpainting_unet = self.model.inpainting_unet
        scaling, factor = self.model.vae_scaling_factor, self.dims.vae_scale_factor
        for k, r in enumerate(requests):
            if not (r.is_edit or inpainting_unet):
                continue
            seeds = [r.seed + i for i in range(r.batch_size)]
            edit = out[k] = _Edit()
            if r.is_edit:
                dist = self._vae_encode(editing.vae_input(r.image))
                edit.init = editing.init_latents(*dist, seeds, scaling)
            if not inpainting_unet:
                if r.mask is not None:
                    edit.mask = editing.latent_mask(r.mask, factor)
                continue
            px = r.mask if r.mask is not None else np.ones((r.height, r.width), np.float32)
            if r.image is not None:
                dist = self._vae_encode(editing.masked_vae_input(r.image, px, px.shape))
            else:  # a generation: the same zero image for every request of the call (one size)
                if blank is None:
                    blank = self._vae_encode(editing.masked_vae_input(None, px, px.shape))
                dist = blank
            masked = editing.init_latents(*dist, seeds, scaling, editing.MASKED_STREAM)
            lmask = editing.latent_mask(px, factor)
            edit.cond = np.stack([editing.unet_condition(lmask, m) for m in masked])
        return out

    def _vae_encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1, 3, H, W) in [-1, 1] -> the latent distribution's (mean, std)."""
        dtype = np.float16 if self.model.precision("vae_encoder") == "fp16" else np.float32
        dist = self.runner("vae_encoder").run({"sample": x.astype(dtype)})
        return dist["latent_mean"], dist["latent_std"]

    def _denoise(self, chunk, steps, scheduler, timings, bar) -> np.ndarray:
        """The denoising loop of one chunk of images -> their final latents (n, C, h, w).

        Images that start later in the schedule (edits below strength 1) join the UNet batch
        at their start step; each start has a scheduler of its own (a multistep scheduler's
        history is per image), so every image is computed exactly as it would be alone. An
        inpainted image's kept region is re-noised from its input after every step (latent
        blending, as diffusers does with a 4-channel UNet)."""
        n, guided = len(chunk), [i for i, im in enumerate(chunk) if im.guided]
        unet_dtype = np.float16 if self.model.precision("unet") == "fp16" else np.float32
        texts = [chunk[i].negative_prompt for i in guided] + [im.prompt for im in chunk]
        emb_all = self.encode(texts).astype(unet_dtype)  # (N, S, D): [uncond of guided] + [cond]
        uncond_row = {j: p for p, j in enumerate(guided)}

        # 0. one scheduler per start index, and each image's latents at its start
        cohorts: dict[int, list[int]] = {}
        for j, im in enumerate(chunk):
            cohorts.setdefault(im.start, []).append(j)
        scheds, latents = {}, np.empty((n, *chunk[0].noise.shape), np.float32)
        for k, idx in cohorts.items():
            sched = scheds[k] = make_scheduler(scheduler, self.scheduler_config)
            sched.set_timesteps(steps)
            noise = np.stack([chunk[j].noise for j in idx])  # (n_k, C, h, w)
            x = noise.astype(np.float32) * np.float32(sched.init_noise_sigma)
            noised = [p for p, j in enumerate(idx) if not chunk[j].from_noise]
            if noised:
                init = np.stack([chunk[idx[p]].init for p in noised])
                x[noised] = sched.add_noise(init, noise[noised], k)
            latents[idx] = x
        timesteps = scheds[min(scheds)].timesteps

        unet = self.runners["unet"]
        t_loop = time.perf_counter()
        for i, t in enumerate(timesteps):
            active = [j for j in range(n) if chunk[j].start <= i]
            if not active:  # only edits, not started yet
                if bar is not None:
                    bar.update(1)
                continue
            live = {k: idx for k, idx in cohorts.items() if k <= i}
            act_guided = [j for j in active if chunk[j].guided]
            scaled = np.empty_like(latents)
            for k, idx in live.items():
                scaled[idx] = scheds[k].scale_model_input(latents[idx], t)
            x = (
                np.concatenate([scaled[act_guided], scaled[active]])
                if act_guided
                else scaled[active]
            )
            if chunk[0].cond is not None:  # an inpainting UNet: (N, 2C + 1, h, w)
                cond = np.stack([chunk[j].cond for j in act_guided + active])
                x = np.concatenate([x, cond], axis=1)
            x = x.astype(unet_dtype, copy=False)  # (N, C, h, w)
            rows = [uncond_row[j] for j in act_guided] + [len(guided) + j for j in active]
            emb = emb_all[rows]
            N, na, ng = len(rows), len(active), len(act_guided)
            ts = np.full((N,), scheds[min(live)].timestep_input(t), dtype=np.float32)
            t0 = time.perf_counter()
            out = unet.run({"sample": x, "timestep": ts, "encoder_hidden_states": emb})[
                "noise_pred"
            ].astype(np.float32, copy=False)  # (N, C, h, w)
            timings.unet_s.append(time.perf_counter() - t0)
            g = np.array([chunk[j].guidance for j in act_guided], np.float32).reshape(-1, 1, 1, 1)
            if not act_guided:
                noise = out
            elif ng == na:
                uncond, cond = out[:na], out[na:]
                noise = uncond + g * (cond - uncond)  # (na, C, h, w)
            else:
                pos = [active.index(j) for j in act_guided]
                uncond, noise = out[:ng], out[ng:].copy()
                noise[pos] = uncond + g * (noise[pos] - uncond)
            for k, idx in live.items():
                pos = [active.index(j) for j in idx]
                latents[idx] = (
                    scheds[k].step(noise[pos], t, latents[idx]).astype(np.float32, copy=False)
                )
                for j in idx:  # inpainting: the kept region back at the next step's level
                    im = chunk[j]
                    if im.mask is None:
                        continue
                    proper = im.init
                    if i < len(timesteps) - 1:
                        proper = scheds[k].add_noise(im.init[None], im.noise[None], i + 1)[0]
                    latents[j] = (1 - im.mask) * proper + im.mask * latents[j]
            if bar is not None:
                bar.update(1)
        timings.loop_s += time.perf_counter() - t_loop
        return latents

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents (n, C, h, w) -> (n, H, W, 3) uint8."""
        vae_dtype = np.float16 if self.model.precision("vae_decoder") == "fp16" else np.float32
        z = (latents / np.float32(self.model.vae_scaling_factor)).astype(vae_dtype)
        return to_uint8(self.runners["vae_decoder"].run({"latent_sample": z})["image"])


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _latent_hw(height: int, width: int, dims) -> tuple[int, int]:
    f = dims.vae_scale_factor
    return height // f, width // f


def _flatten(
    requests: Sequence[ResolvedRequest], shape: tuple[int, ...], edits: dict[int, _Edit]
) -> list[_Image]:
    """Every image of every request, in order, with its initial noise (and, for an edit, its
    start index, init latents and latent mask from ``edits``; an inpainting UNet's extra
    channels)."""
    images = []
    for k, r in enumerate(requests):
        noise = r.latents if r.latents is not None else initial_noise(r.seed, r.batch_size, shape)
        e = edits.get(k, _Edit())
        for i in range(r.batch_size):
            images.append(_Image(
                k, r.seed + i, r.prompt, r.negative_prompt, r.guidance, noise[i],
                start=r.start_index(), init=None if e.init is None else e.init[i], mask=e.mask,
                cond=None if e.cond is None else e.cond[i],
            ))  # fmt: skip
    return images


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (diffusers' postprocess)."""
    x = np.clip(image.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)
