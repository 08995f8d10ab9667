"""The Stable Diffusion 1.5 architecture from its configs, with random seeded weights.

Nothing can be downloaded here, and latency/memory do not depend on weight values, so
benchmarks and real-size export/engine tests build SD 1.5-shaped models from these configs
(copied from the published ``unet/``, ``vae/`` and ``text_encoder/`` config.json files of
SD 1.5 and bert-base-chinese).
"""

from __future__ import annotations

import os
from pathlib import Path

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

BERT_BASE_CHINESE = dict(
    model_type="bert",
    vocab_size=21128,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
)


def make_sd15(out: str | os.PathLike, seed: int = 0, text_encoder: bool = True) -> Path:
    """Write an SD 1.5-shaped diffusers pipeline directory with random weights (~4 GB)."""
    from iap_rt.train.tiny import write_sd_dir

    return write_sd_dir(out, seed, SD15_UNET, SD15_VAE, CLIP_L_TEXT if text_encoder else None)


def make_sd15_encoder(out: str | os.PathLike, seed: int = 0, max_length: int = 77) -> Path:
    """A bert-base-chinese-sized chinese_encoder/ (12 layers, 768 wide: no projection)."""
    from iap_rt.train.tiny import make_tiny_encoder

    return make_tiny_encoder(out, seed, 768, max_length, bert=BERT_BASE_CHINESE)
