"""Image editing's numerics (numpy): the image as the VAE encoder's input, the init latents
sampled from its latent distribution, the mask in latent space, an inpainting UNet's extra
input channels (mask + masked-image latents), and the final composite that keeps the input's
pixels outside the mask.

Each follows diffusers (``VaeImageProcessor``, ``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline``); the one deliberate difference is the sample from the
latent distribution, drawn from the image's own seed (a numpy generator: stream 1 for the
image, stream 2 for the masked image) so an edit is reproducible from its seed like a
generation, and each image of a batch equals its seed alone.
"""

from __future__ import annotations

import numpy as np


def vae_input(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1] (``VaeImageProcessor``:
    ``x / 255``, then ``2x - 1``)."""
    x = image.astype(np.float32) / np.float32(255.0)
    return (np.float32(2.0) * x - np.float32(1.0)).transpose(2, 0, 1)[None]


IMAGE_STREAM, MASKED_STREAM = 1, 2  # the seed's streams that sample the two latents


def sample_noise(seed: int, shape: tuple[int, ...], stream: int = IMAGE_STREAM) -> np.ndarray:
    """The N(0, 1) draw that samples image ``seed``'s latent (streams of its own, apart from
    the initial noise ``iap_rt.pipeline.initial_noise`` draws from the same seed)."""
    return np.random.default_rng([seed, stream]).standard_normal(shape, dtype=np.float32)


def init_latents(
    mean: np.ndarray, std: np.ndarray, seeds: list[int], scaling: float, stream: int = IMAGE_STREAM
):
    """(n, C, h, w) = scaling x (mean + std x noise(seed)) per seed, from one image's (1, C,
    h, w) latent distribution (diffusers' ``latent_dist.sample()`` then ``scaling_factor``)."""
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    out = [mean[0] + std[0] * sample_noise(s, mean.shape[1:], stream) for s in seeds]
    return np.float32(scaling) * np.stack(out)


def masked_vae_input(image: np.ndarray | None, mask: np.ndarray, size: tuple[int, int]):
    """An inpainting UNet's masked image as the VAE encoder's input (1, 3, H, W): the image
    with the region to repaint set to 0 (diffusers: ``image * (mask < 0.5)`` in [-1, 1]); no
    image (a generation): all 0, i.e. everything is to be painted."""
    if image is None:
        return np.zeros((1, 3, *size), np.float32)
    return vae_input(image) * (mask < 0.5).astype(np.float32)[None, None]


def unet_condition(mask: np.ndarray, masked_latents: np.ndarray) -> np.ndarray:
    """(C + 1, h, w): the channels an inpainting UNet reads after the latents, in diffusers'
    order (``cat([latents, mask, masked_image_latents], dim=1)``); ``mask`` (1, h, w)."""
    return np.concatenate([mask, masked_latents]).astype(np.float32)


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) in {0, 1} -> (1, h, w): nearest-neighbour down-sampling, as diffusers'
    ``interpolate(mask, size=(h, w))`` (its default mode)."""
    return np.ascontiguousarray(mask[::factor, ::factor][None]).astype(np.float32)


def composite(decoded: np.ndarray, image: np.ndarray, mask: np.ndarray, blur: int) -> np.ndarray:
    """(n, H, W, 3) uint8 results with every pixel outside ``mask`` the input's own, and a
    feather of ``blur`` pixels *inside* the mask (Gaussian blur of the mask, clipped to it), so
    nothing outside the mask changes."""
    weight = mask.astype(np.float32)
    if blur > 0:
        from PIL import Image, ImageFilter

        soft = Image.fromarray((weight * 255).round().astype(np.uint8))
        soft = np.asarray(soft.filter(ImageFilter.GaussianBlur(blur)), np.float32) / 255.0
        weight = np.minimum(weight, soft)
    w = weight[None, :, :, None]
    out = image[None].astype(np.float32) * (1 - w) + decoded.astype(np.float32) * w
    return out.round().clip(0, 255).astype(np.uint8)
