"""What a request means: the one owner of its defaults and rules.

Every front end (``iap-rt generate``, the Python API, the gateway, the Triton model,
``generate --server`` through the gateway, ``iap-rt bench``) says what it wants in a
:class:`PromptRequest`, where ``None`` means "the model decides", and calls :func:`resolve`
once. :func:`resolve` fills every default from the model (:class:`~iap_rt.modeldir.ModelDir`:
scheduler, guidance, size; steps: :data:`DEFAULT_STEPS`), checks every rule once with a
:class:`RequestError` that names the field, the rule and the value, and returns a
:class:`ResolvedRequest`, which :meth:`iap_rt.pipeline.Pipeline.generate` trusts as it is.

A resolved request also carries the model's notice for prompts outside what the model knows
(:func:`notice`: a model may declare the words of its caption world in its manifest; the
embedded toy model does) and the fingerprint of the model it was resolved against, so a
Triton model that receives rows the gateway resolved against the same model does not check
them again (:func:`trusted`).

The server's own limits (most steps, images, pixels per request) are the gateway's, on top
of these rules (:mod:`iap_rt.serve.openai_api`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from iap_rt.errors import InputError
from iap_rt.schedulers import SCHEDULERS

LOG = logging.getLogger("iap_rt.requests")

DEFAULT_STEPS = 25
DEFAULT_STRENGTH = 0.8  # image to image, as diffusers
DEFAULT_MASK_BLUR = 4  # pixels of feather inside the mask when the result is composited
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0  # beyond this classifier-free guidance only saturates the image
MAX_SEED = 2**63 - 1  # every image's seed (seed + i) must stay within this


class RequestError(InputError):
    """A request breaks a rule; ``field`` names the request field (``steps``, ``height``,
    ``guidance``, ...) so a front end can point at its own name for it."""

    def __init__(self, field: str, message: str, fix: str | None = None):
        super().__init__(message, fix)
        self.field = field


@dataclass(frozen=True)
class PromptRequest:
    """What a caller asks for: ``batch_size`` images of ``prompt`` with seeds ``seed, seed + 1,
    ...``. ``None`` = the model's default (guidance, steps, height, width, scheduler);
    guidance <= 1 turns classifier-free guidance off for these images. ``latents``: the
    initial noise (batch_size, C, h, w) instead of noise from the seed.

    Editing: ``image`` (H, W, 3 uint8) is noised to the step ``strength`` names (default 0.8)
    and denoised from there (image to image); with ``mask`` (H, W; white / 1 = repaint, black
    / 0 = keep) only the masked region is repainted (inpainting) and the kept pixels are the
    image's own, feathered ``mask_blur`` pixels into the mask."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    guidance: float | None = None
    batch_size: int = 1
    latents: np.ndarray | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float | None = None
    mask_blur: int | None = None


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in and every rule checked (only :func:`resolve`
    and :func:`trusted` make one). ``notice``: the model's word on a prompt outside what it
    knows (or None); ``model_key``: the fingerprint of the model it was resolved against."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance: float
    batch_size: int
    steps: int
    height: int
    width: int
    scheduler: str
    latents: np.ndarray | None = None
    notice: str | None = None
    model_key: str = ""
    image: np.ndarray | None = None  # (H, W, 3) uint8: an edit
    mask: np.ndarray | None = None  # (H, W) float32 in {0, 1}: 1 = repaint
    strength: float | None = None  # edits only
    mask_blur: int = 0

    @property
    def is_edit(self) -> bool:
        return self.image is not None

    def start_index(self) -> int:
        """The schedule index the loop starts at: 0, or for an edit diffusers' ``get_timesteps``
        (``steps - int(steps * strength)``)."""
        if not self.is_edit:
            return 0
        return self.steps - min(int(self.steps * self.strength), self.steps)

    @property
    def call_key(self) -> tuple[int, str, int, int]:
        """What requests must share to run in one UNet batch: steps, scheduler, height,
        width."""
        return (self.steps, self.scheduler, self.height, self.width)

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    def part(self, start: int, count: int) -> ResolvedRequest:
        """Images ``start .. start + count - 1`` of this request as a request of their own
        (seed ``seed + start``): a part of a checked request needs no check."""
        if not (0 <= start and 1 <= count and start + count <= self.batch_size):
            raise ValueError(f"part({start}, {count}) of a request of {self.batch_size} images")
        latents = None if self.latents is None else self.latents[start : start + count]
        return replace(self, seed=self.seed + start, batch_size=count, latents=latents)

    def params(self) -> dict:
        """The settings every image of this request records (its PNG's parameters)."""
        out = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance": float(self.guidance),
            "scheduler": self.scheduler,
            "height": self.height,
            "width": self.width,
        }
        if self.is_edit:
            out |= {"strength": float(self.strength), "inpaint": self.mask is not None}
            if self.mask is not None:
                out["mask_blur"] = self.mask_blur
        return out


def model_defaults(model) -> dict:
    """The model's answers to what a request leaves unset (for ``/info`` and clients)."""
    return {
        "steps": DEFAULT_STEPS,
        "guidance": model.default_guidance,
        "scheduler": model.default_scheduler,
        "height": model.default_size,
        "width": model.default_size,
        "size_multiple": model.dims.pixel_multiple,
        "schedulers": list(SCHEDULERS),
    }


def resolve(model, request: PromptRequest) -> ResolvedRequest:
    """``request`` against ``model`` (:class:`~iap_rt.modeldir.ModelDir`): every default
    filled, every rule checked once (:class:`RequestError` naming the field, rule and value)."""
    r = request
    steps = DEFAULT_STEPS if r.steps is None else r.steps
    guidance = model.default_guidance if r.guidance is None else r.guidance
    image = _check_image(r.image, model.dims) if r.image is not None else None
    size = (None, None) if image is None else image.shape[:2]
    height = (size[0] or model.default_size) if r.height is None else r.height
    width = (size[1] or model.default_size) if r.width is None else r.width
    if image is not None and (height, width) != size:
        raise RequestError(
            "height" if height != size[0] else "width",
            f"the image is {size[1]}x{size[0]} pixels but {width}x{height} was asked",
            fix="resize the image to the size you want (iap-rt generate --image resizes it "
            "when you pass --height/--width), or leave the size out: an edit keeps the "
            "image's.",
        )
    scheduler = r.scheduler
    if scheduler is None or scheduler == "":  # "": unset, as on the Triton wire
        scheduler = model.default_scheduler
    _check_text(r.prompt, r.negative_prompt)
    _check_size(model.dims, height, width)
    _check_steps(steps, model.num_train_timesteps)
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise RequestError("scheduler", f"unknown scheduler {scheduler!r}",
                           fix=f"use one of {', '.join(SCHEDULERS)}.")  # fmt: skip
    _check_guidance(guidance)
    seed, batch_size = _check_seed(r.seed, r.batch_size)
    latents = _check_latents(r.latents, batch_size, model.dims, height, width)
    strength, mask, mask_blur = _check_edit(r, image, int(steps))
    resolved = ResolvedRequest(
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        seed=seed,
        guidance=float(guidance),
        batch_size=batch_size,
        steps=int(steps),
        height=int(height),
        width=int(width),
        scheduler=scheduler,
        latents=latents,
        notice=notice(model, r.prompt),
        model_key=model.fingerprint,
        image=image,
        mask=mask,
        strength=strength,
        mask_blur=mask_blur,
    )
    LOG.info("resolved request: %d image(s), %d steps, %s, %dx%d, guidance %g",
             batch_size, resolved.steps, scheduler, resolved.width, resolved.height,
             resolved.guidance)  # fmt: skip
    return resolved


def trusted(model, fields: dict, model_key: str) -> ResolvedRequest | None:
    """A request another process resolved against this same model (``model_key`` equals its
    fingerprint), rebuilt without checking it again; None when it was resolved against
    another model (or not at all): then it must go through :func:`resolve`."""
    if not model_key or model_key != model.fingerprint:
        return None
    return ResolvedRequest(**fields, notice=notice(model, fields["prompt"]), model_key=model_key)


def notice(model, prompt: str) -> str | None:
    """One line for a prompt that uses none of the words the model declares it knows
    (manifest ``caption_world``: ``words``, ``draws``, ``examples``); None otherwise, and
    always None for models that declare nothing (real SD models)."""
    world = model.caption_world
    if not world or not world.get("words"):
        return None
    if any(w in prompt for w in world["words"]):
        return None
    examples = world.get("examples") or []
    tries = f' Try e.g. "{examples[0]}".' if examples else ""
    return (
        f"note: the model {model.model_id!r} draws {world.get('draws', 'a small world')} and "
        f"knows none of the words in this prompt, so the image cannot show it.{tries} For real "
        "images, pass --model DIR with your own exported Stable Diffusion (README: the real "
        "workflow)."
    )


# ---- the rules ---------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_text(prompt, negative_prompt) -> None:
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(negative_prompt, str):
        raise RequestError(
            "negative_prompt",
            f"negative prompt must be a string, got {type(negative_prompt).__name__}",
        )


def _check_size(dims, height, width) -> None:
    f = dims.pixel_multiple
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v <= 0 or v % f:
            raise RequestError(
                name,
                f"{name} must be a positive multiple of {f}, got {v!r}",
                fix=f"use e.g. --{name} {max(f, (int(v) // f) * f if _is_int(v) else 512)} "
                f"(the UNet halves the latents {dims.unet_downsamples} times; the VAE scales "
                f"by {dims.vae_scale_factor}).",
            )


def _check_steps(steps, train_timesteps: int) -> None:
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise RequestError("steps", f"steps must be an integer from 1 to {MAX_STEPS}, got "
                           f"{steps!r}", fix="use e.g. --steps 25.")  # fmt: skip
    if steps > train_timesteps:
        raise RequestError(
            "steps", f"steps {steps} exceeds the model's {train_timesteps} training timesteps"
        )


def _check_guidance(guidance) -> None:
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float, np.integer, np.floating))
        or not math.isfinite(guidance)
        or not 0 <= guidance <= MAX_GUIDANCE
    ):
        raise RequestError(
            "guidance",
            f"guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {guidance!r}",
            fix="use e.g. --guidance 7.5 (<= 1 turns classifier-free guidance off).",
        )


def _check_seed(seed, batch_size) -> tuple[int, int]:
    if not _is_int(batch_size) or batch_size < 1:
        raise RequestError("batch_size", f"batch size must be an integer >= 1, got "
                           f"{batch_size!r}")  # fmt: skip
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"seed must be an integer from 0 to 2**63-1, got {seed!r}")
    seed, batch_size = int(seed), int(batch_size)  # Python ints: numpy's would wrap
    if seed + batch_size - 1 > MAX_SEED:
        raise RequestError(
            "seed",
            f"seed {seed} with batch size {batch_size}: image {batch_size - 1} would use "
            f"seed {seed + batch_size - 1}, past 2**63-1",
            fix=f"use a seed of at most {MAX_SEED - batch_size + 1}.",
        )
    return seed, batch_size


def _check_image(image, dims) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array whose sides are multiples of the model's pixel
    multiple; else the nearest sizes that are."""
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or (image.shape[2] != 3)
    ):
        raise RequestError(
            "image", "the image must be an (H, W, 3) uint8 RGB array, got "
            f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}",
            fix="load it with iap_rt.images.load_image (EXIF rotation, alpha, greyscale, 16 "
            "bits handled).",
        )  # fmt: skip
    f = dims.pixel_multiple
    h, w = image.shape[:2]
    if h % f or w % f or not h or not w:
        sizes = sorted({(max(f, (w // f) * f), max(f, (h // f) * f)),
                        (-(-w // f) * f, -(-h // f) * f)})  # fmt: skip
        raise RequestError(
            "image", f"the image is {w}x{h} pixels; this model needs sides that are multiples "
            f"of {f}",
            fix="crop or resize it to " + " or ".join(f"{a}x{b}" for a, b in sizes)
            + " (iap-rt generate --image resizes it when you pass --height/--width).",
        )  # fmt: skip
    return np.ascontiguousarray(image)


def _check_edit(r, image, steps: int) -> tuple[float | None, np.ndarray | None, int]:
    """(strength, mask in {0, 1} float32, mask_blur) of an edit; (None, None, 0) otherwise."""
    if image is None:
        for name, v in (("strength", r.strength), ("mask", r.mask)):
            if v is not None:
                raise RequestError(name, f"{name} edits an image, but no image was given",
                                   fix="pass the image to edit (--image), or drop it.")  # fmt: skip
        return None, None, 0
    strength = DEFAULT_STRENGTH if r.strength is None else r.strength
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float, np.integer, np.floating))
        or not math.isfinite(strength)
        or not 0 < strength <= 1
    ):
        raise RequestError("strength", f"strength must be a number in (0, 1], got {strength!r}",
                           fix="use e.g. --strength 0.6 (1 = repaint entirely).")  # fmt: skip
    if int(steps * strength) < 1:
        raise RequestError(
            "strength", f"strength {strength:g} with {steps} steps denoises no step "
            f"(int({steps} x {strength:g}) = 0)",
            fix=f"use a strength of at least {1 / steps:.3g}, or more steps.",
        )  # fmt: skip
    mask = None
    if r.mask is not None:
        m = np.asarray(r.mask)
        if m.shape != image.shape[:2]:
            raise RequestError("mask", f"the mask is {m.shape[1::-1] if m.ndim == 2 else m.shape} "
                               f"but the image is {image.shape[1]}x{image.shape[0]}",
                               fix="use a mask of the image's size.")  # fmt: skip
        scale = 255.0 if m.dtype == np.uint8 else 1.0
        mask = (m.astype(np.float32) / scale >= 0.5).astype(np.float32)  # diffusers binarises
        if not mask.any():
            raise RequestError("mask", "the mask selects nothing (no white pixel)",
                               fix="paint the region to repaint white, or drop the mask to "
                               "edit the whole image.")  # fmt: skip
    blur = DEFAULT_MASK_BLUR if r.mask_blur is None else r.mask_blur
    if not _is_int(blur) or not 0 <= blur <= 64:
        raise RequestError("mask_blur", f"mask blur must be an integer from 0 to 64 pixels, got "
                           f"{blur!r}")  # fmt: skip
    return float(strength), mask, int(blur)


def _check_latents(latents, batch_size: int, dims, height: int, width: int):
    if latents is None:
        return None
    f = dims.vae_scale_factor
    shape = (batch_size, dims.latent_channels, height // f, width // f)
    try:
        noise = np.asarray(latents, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise RequestError("latents", f"latents must be a float array: {e}") from None
    if noise.shape != shape:
        raise RequestError("latents", f"latents of shape {noise.shape}, expected {shape}")
    if not np.isfinite(noise).all():
        raise RequestError("latents", "latents hold nan or inf", fix="pass finite initial noise.")
    return noise
