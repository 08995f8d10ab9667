"""Sampling toy images for evaluation: the diffusers (torch) generator and image grids.

The "generate images" step of an evaluation is a swappable function ``(prompts, seeds) ->
(N, 32, 32, 3) uint8``: :func:`diffusers_generator` samples a diffusers-format base (English
prompts) with the PyTorch twin of the runtime (:mod:`iap_rt.train.reference`, DDIM,
classifier-free guidance). World v2's evaluation (:mod:`iap_rt.train.toy2.evaluate`) uses it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EVAL_SEED = 20261124

GenerateFn = Callable[[list[str], list[int]], np.ndarray]


def grid(images: np.ndarray, cols: int, scale: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) images into one (rows*H*scale, cols*W*scale, 3) image."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    pad = np.full((rows * cols - n, h, w, 3), 255, np.uint8)
    g = np.concatenate([images, pad]).reshape(rows, cols, h, w, 3)
    g = g.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    return g.repeat(scale, 0).repeat(scale, 1)


# ---- the diffusers (torch) generator -------------------------------------------------------------
def diffusers_generator(
    model_dir,
    steps: int = 25,
    guidance: float = 3.0,
    batch: int = 48,
    threads: int = 1,
    numpy_noise: bool = False,
) -> GenerateFn:
    """Sample a diffusers-format toy base: DDIM (eta 0), classifier-free guidance, run by the
    PyTorch twin of the runtime (:class:`iap_rt.train.reference.TorchPipeline`) on the base's
    CLIP embeddings (``""`` as the unconditional prompt), ``batch`` prompts per UNet call.

    ``numpy_noise``: draw image noise with :func:`iap_rt.pipeline.initial_noise` (the runtime's),
    so images match :func:`runtime_generator`'s for the same seed; else torch's generator."""
    import torch

    from iap_rt.pipeline import initial_noise as noise
    from iap_rt.train.reference import TorchPipeline
    from iap_rt.train.toy.base import load_base, tokenize

    torch.set_num_threads(threads)
    tok, text, unet, vae, sched_cfg = load_base(model_dir)
    ref = TorchPipeline(unet, vae, sched_cfg, default_scheduler="ddim")
    channels = unet.config.in_channels
    size = unet.config.sample_size

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        out = []
        uncond = text(tokenize(tok, [""])).last_hidden_state  # (1, S, D)
        for i in range(0, len(prompts), batch):
            p, s = prompts[i : i + batch], seeds[i : i + batch]
            cond = text(tokenize(tok, p)).last_hidden_state  # (b, S, D)
            ctx = torch.cat([uncond.expand_as(cond), cond])  # (2b, S, D)
            if numpy_noise:
                z = torch.from_numpy(
                    np.concatenate([noise(x, 1, (channels, size, size)) for x in s])
                )
            else:
                z = torch.stack(
                    [
                        torch.randn(
                            channels, size, size, generator=torch.Generator().manual_seed(x)
                        )
                        for x in s
                    ]
                )  # (b, C, h, w)
            z = ref.denoise(ctx, z, steps, guidance, "ddim")  # (b, C, h, w)
            x = ref.decode(z)  # (b, 3, H, W) in [-1, 1]
            img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    return generate
