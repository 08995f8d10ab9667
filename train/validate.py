"""Validation on held-out triples, and optional sample images from fixed Chinese prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from iap_rt.fileio import atomic_path, ensure_dir
from iap_rt.tokenizer import PromptTokenizer
from iap_rt.train.dataset import CachedSet, batch_to, make_batch, val_seeds
from iap_rt.train.models import Frozen
from iap_rt.train.objectives import IapUNet, alignment_metrics


@torch.no_grad()
def validate(
    iap: IapUNet, frozen: Frozen, encoder, ds: CachedSet, batch_size: int, seed: int, device
) -> dict:
    """Mean alignment loss and attentive-feature cosine over ``ds`` (fixed noise and t)."""
    was_training = encoder.training
    encoder.eval()
    totals, n = {"val_loss": 0.0, "val_cosine": 0.0}, 0
    dtype = frozen.unet.dtype
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(start + batch_size, len(ds))))
        b = make_batch(ds, idx, val_seeds(seed, idx), frozen, dropout=0.0)
        b = batch_to(b, device, dtype)
        zh = encoder(b["zh_ids"], b["zh_mask"])  # (B, S_zh, D)
        m = alignment_metrics(iap, b["x_t"], b["t"], b["en"], zh)
        for k in totals:
            totals[k] += m[k] * len(idx)
        n += len(idx)
    encoder.train(was_training)
    return {k: v / n for k, v in totals.items()}


@torch.no_grad()
def sample_images(
    frozen: Frozen,
    encoder,
    tok: PromptTokenizer,
    prompts: tuple[str, ...],
    out: Path,
    resolution: int,
    steps: int,
    seed: int,
    device,
) -> list[Path]:
    """Generate one PNG per prompt with the PyTorch pipeline and Chinese embeddings."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    was_training = encoder.training
    encoder.eval()
    pipe = StableDiffusionPipeline(
        vae=frozen.vae,
        text_encoder=frozen.text_encoder,
        tokenizer=frozen.tokenizer,
        unet=frozen.unet,
        scheduler=DDIMScheduler.from_config(frozen.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    enc = tok(["", *prompts])
    ids = torch.from_numpy(enc.input_ids).to(device)  # (1 + P, S)
    mask = torch.from_numpy(enc.attention_mask).to(device)  # (1 + P, S)
    emb = encoder(ids, mask).to(frozen.unet.dtype)  # (1 + P, S, D)
    paths = []
    for i in range(len(prompts)):
        image = pipe(
            prompt_embeds=emb[i + 1 : i + 2],
            negative_prompt_embeds=emb[:1],
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + i),
        ).images[0]
        path = ensure_dir(out) / f"{i:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    encoder.train(was_training)
    return paths
