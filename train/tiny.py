"""Tiny, seeded, random-weight models built from configs (no hub downloads).

- :func:`make_tiny_sd` writes a diffusers-format SD pipeline directory (unet/, vae/,
  text_encoder/, tokenizer/, scheduler/) shaped like SD 1.x but small: UNet
  block_out_channels (32, 64), cross_attention_dim 32; a 2-layer CLIPTextModel with the real
  CLIP BPE tokenizer; a tiny AutoencoderKL with SD's 8x down-sampling.
- :func:`make_tiny_encoder` writes a ``chinese_encoder/`` directory: a 2-layer BERT with the
  real bert-base-chinese WordPiece vocabulary and a projection to the UNet's width.

Tests, the embedded placeholder model and ``iap-rt bench --arch tiny`` use these
(the full-size SD 1.5 architectures are in :mod:`iap_rt.train.sd15`).
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path

import torch

from iap_rt.fileio import ensure_dir, write_json_atomic, write_text_atomic

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=32,
)

TINY_BERT = dict(
    model_type="bert",
    vocab_size=21128,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    type_vocab_size=2,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (ported from openai/CLIP simple_tokenizer.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(out: str | os.PathLike, max_length: int = 77) -> Path:
    """vocab.json + merges.txt of the real CLIP BPE (ids match the released tokenizer)."""
    out = ensure_dir(out)
    gz = resources.files("iap_rt") / "data" / "vocab" / "clip-bpe-simple-vocab-16e6.txt.gz"
    merges = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_json_atomic(out / "vocab.json", {t: i for i, t in enumerate(vocab)})
    write_text_atomic(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_json_atomic(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        },
    )
    return out


def write_sd_dir(
    out: str | os.PathLike, seed: int, unet: dict, vae: dict, clip: dict | None
) -> Path:
    """Write a diffusers-format SD 1.x pipeline directory from configs, seeded per network
    (UNet ``seed``, VAE ``seed + 1``, CLIP text ``seed + 2``); ``clip=None`` skips the text
    encoder (iap-rt's export and runtime never use it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = ensure_dir(out)
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet).save_pretrained(out / "unet")
    torch.manual_seed(seed + 1)
    AutoencoderKL(**vae).save_pretrained(out / "vae")
    if clip is not None:
        torch.manual_seed(seed + 2)
        CLIPTextModel(CLIPTextConfig(**clip)).save_pretrained(out / "text_encoder")
    write_clip_tokenizer(out / "tokenizer")
    write_json_atomic(out / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    write_json_atomic(
        out / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"],
        },
    )
    return out


def make_tiny_sd(out: str | os.PathLike, seed: int = 0, unet: dict | None = None) -> Path:
    """Write a tiny diffusers-format SD 1.x-shaped pipeline directory to ``out``."""
    return write_sd_dir(out, seed, unet or TINY_UNET, TINY_VAE, TINY_CLIP)


def make_tiny_inpaint_unet(out: str | os.PathLike, seed: int = 3) -> Path:
    """Write a tiny *inpainting* UNet folder (config.json + safetensors) of the tiny SD: the
    same architecture with 9 input channels (latents, mask, masked-image latents), what
    ``iap-rt export --unet`` plugs into a model made with the plain base."""
    from diffusers import UNet2DConditionModel

    out = ensure_dir(out)
    torch.manual_seed(seed)
    UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9}).save_pretrained(out)
    return out


def make_tiny_encoder(
    out: str | os.PathLike,
    seed: int = 0,
    projection_dim: int = 32,
    max_length: int = 32,
    bert: dict | None = None,
) -> Path:
    """Write a ``chinese_encoder/`` from a BERT config (default: the tiny 2-layer one) + a projection
    to ``projection_dim`` where the widths differ, with the real WordPiece vocabulary."""
    from iap_rt.tokenizer import bert_chinese_vocab_path, build_wordpiece_tokenizer
    from iap_rt.train.encoder import ChineseTextEncoder, load_encoder_config

    out = ensure_dir(out)
    cfg_file = out / "config.json"
    write_text_atomic(cfg_file, json.dumps(bert or TINY_BERT))
    torch.manual_seed(seed)
    model = ChineseTextEncoder(load_encoder_config(cfg_file), projection_dim, max_length)
    model.save(out, tokenizer=build_wordpiece_tokenizer(bert_chinese_vocab_path()))
    write_text_atomic(out / "vocab.txt", bert_chinese_vocab_path().read_text("utf-8"))
    return out
