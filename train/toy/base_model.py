"""The toy English base model: its configuration, networks, word tokenizer and directory.

A toy base is an ordinary SD 1.x-shaped diffusers pipeline directory, which ``iap-rt train
--base`` and ``iap-rt export --base`` load with ``from_pretrained`` (local files only)::

    unet/            UNet2DConditionModel (EMA weights), pixel-space 32x32x3 "latents"
    vae/             AutoencoderKL with fixed weights: a (near) lossless standardising identity
                     (:mod:`iap_rt.train.toy.vae`), vae_scale_factor 1
    text_encoder/    CLIPTextModel, 64 wide x 4 layers (EMA weights)
    tokenizer/       CLIPTokenizer with a word-level vocabulary (vocab.json + merges.txt whose
                     merges spell out every caption word, so each word is one token)
    scheduler/       scheduler_config.json (diffusers field names)
    model_index.json
    toy_base.json    how it was trained: config, steps, samples seen, minutes, data meta

:mod:`iap_rt.train.toy.base` trains one (``iap-rt toy base``); the committed one,
``iap_rt/data/toy_base`` (:func:`shipped_base_dir`), is what the embedded default model was
exported from and what the transfer grid, claim, curves and plug-in runs start from.

What made shape and position learnable (measured on one-object scenes, held-out English
prompts): the prototype's UNet (three levels on 16x16) and a first version of this one (five
levels, attention on every level below 32x32 with 8 heads 4-8 wide, batch 32) drew
well-coloured blobs anywhere: after ~1,900 steps shape 0.27 and position 0.19, i.e. chance.
The five-level UNet itself was the problem: at 2x2 every cell sees a different zero-padding
pattern, so the bottleneck can turn a caption into a layout. Self-attention over the 256
tokens of the 16x16 level, with 4-wide heads, took 42% of a training step; without attention
at 32x32 and 16x16 and with 2 heads (16/32 wide) a sample costs 4.2 ms instead of 10.9 ms
(fwd + bwd, 2 threads), so batch 64 fits the budget. After 9 minutes (1,270 steps, 81k
samples) the same evaluation gave colour 1.0, shape 0.79, position 1.0. Which change mattered
most is not isolated (one run each; the old v-prediction run had also resumed from
epsilon-trained weights, ~60k samples).

torch / diffusers / transformers are imported inside functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from iap_rt.errors import ArtifactNotFoundError
from iap_rt.fileio import ensure_dir, write_json_atomic, write_text_atomic
from iap_rt.train.toy import shapes as toydata

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 20  # tokens: 16 words + BOS/EOS, rounded up (a unit test pins the longest caption)


@dataclass(frozen=True)
class BaseConfig:
    """How the toy base model is built and trained."""

    # UNet (pixel space, 32x32x3)
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64, 64)  # 32 -> 16 -> 8 -> 4 -> 2
    # No attention at 32x32 and 16x16: self-attention over 256 tokens with 4-wide heads was
    # 42% of a training step; without it (and with 2 heads, 16/32 wide) a sample costs 4.2 ms
    # instead of 10.9 ms on this CPU (fwd + bwd, batch 64, 2 threads), so the 60-minute budget
    # sees 2.6x more samples. 32-wide heads are also in TensorRT's fused-MHA range. Cross-
    # attention also at 16x16 (``attention_blocks(4)``) cost 1.4x per step and scored lower at
    # equal CPU time (bench/results/toy2_base_ab.json).
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    )
    layers_per_block: int = 1
    attention_heads: int = 2  # diffusers' attention_head_dim (= number of heads here)
    norm_num_groups: int = 8
    # CLIP text encoder
    text_width: int = 64  # = UNet cross_attention_dim
    # one more layer than the one-object world's base needed: the UNet must learn which colour
    # and shape belong to which side
    text_layers: int = 4
    text_heads: int = 4
    max_length: int = MAX_LENGTH  # tokens incl. BOS/EOS
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # DDPM's 1e-4 .. 0.02: pixel space needs the long tail
    beta_start: float = 0.0001
    beta_end: float = 0.02
    # v-prediction: with epsilon, x0 = (x_t - sqrt(1-a) eps) / sqrt(a) amplifies eps errors by
    # 1/sqrt(a) ~ 150 near t = T on this schedule; a 12-minute epsilon run drew the right
    # blobs on wildly wrong backgrounds. v keeps the early steps well conditioned.
    prediction_type: str = "v_prediction"
    # Loss weight per timestep. Plain v-MSE equals (1 + SNR) x the x0-MSE, so high-noise steps,
    # where the layout (position!) is decided, keep weight ~1. min-SNR-5 (min(SNR, 5) x the
    # x0-MSE) and plain epsilon-MSE (SNR x the x0-MSE) both vanish there: with them colour was
    # learned but position stayed at chance. 0 = plain v-MSE; > 0 = min-SNR with that gamma.
    min_snr_gamma: float = 0.0
    # optimisation
    batch_size: int = 64
    lr: float = 8e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    # Linear decay of the learning rate to 0 over this final fraction of the budget (CPU time, or
    # ``max_steps`` when that ends the run first); 0 = constant after warm-up. With the decay
    # and an EMA over ~200 steps the run ends on a cooled-down model: the first two-object base
    # (constant rate, EMA 0.999 over ~1000 of its 2125 steps) was still improving when its 90
    # minutes ran out, and its EMA and raw weights scored the same (toy2_base_attempt1.json).
    lr_decay_fraction: float = 0.3
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    seed: int = 0
    threads: int = 2  # torch threads (``iap-rt toy base`` passes its --threads, default 1)
    checkpoint_minutes: float = 3.0
    log_every: int = 50
    # {"text_aux_weight": w}: the auxiliary scene-from-text loss (:func:`.base.scene_loss`)
    extra: dict = field(default_factory=dict)


def attention_blocks(levels: int) -> dict:
    """``down_block_types`` with cross-attention on the ``levels`` lowest-resolution levels
    (``iap-rt toy base --attention-levels``; the default is 3: 8x8 and below)."""
    n_levels = len(BaseConfig().block_out_channels)
    if not 1 <= levels <= n_levels:
        raise ValueError(f"attention levels must be 1..{n_levels}, got {levels}")
    kinds = ("DownBlock2D",) * (n_levels - levels) + ("CrossAttnDownBlock2D",) * levels
    return {"down_block_types": kinds}


# ---- tokenizer ---------------------------------------------------------------------------------
def word_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """vocab.json + merges for a CLIP BPE tokenizer that reads every word of ``words`` whole.

    The merges are *learned* by ordinary BPE on the word list itself until every word is one
    symbol (applying learned merges by rank reproduces the training segmentation, so each
    word becomes one token). The vocabulary holds every single character (plain and
    ``</w>``-final), every merged symbol, and BOS/EOS; unknown words fall back to pieces.
    """
    chars = sorted({ch for w in words for ch in w} | set("abcdefghijklmnopqrstuvwxyz"))
    tokens = chars + [ch + "</w>" for ch in chars]
    segs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))]
    merges: list[str] = []
    while any(len(s) > 1 for s in segs):
        counts: dict[tuple[str, str], int] = {}
        for s in segs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        new = []
        for s in segs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(tuple(out))
        segs = new
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_word_tokenizer(out: str | os.PathLike, words: list[str], max_length: int) -> Path:
    """Write a CLIPTokenizer directory (vocab.json, merges.txt, tokenizer_config.json)."""
    out = ensure_dir(out)
    vocab, merges = word_vocab(words)
    write_json_atomic(out / "vocab.json", vocab)
    write_text_atomic(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_json_atomic(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": EOS,
        },
    )
    return out


def load_tokenizer(path: str | os.PathLike):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, texts: list[str]):
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# ---- models ------------------------------------------------------------------------------------
def unet_config(cfg: BaseConfig) -> dict:
    up = tuple(
        "CrossAttnUpBlock2D" if "CrossAttn" in d else "UpBlock2D"
        for d in reversed(cfg.down_block_types)
    )
    return dict(
        sample_size=toydata.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=up,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups,
    )


def text_config(cfg: BaseConfig, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=cfg.text_width,
    )


def scheduler_config(cfg: BaseConfig) -> dict:
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": cfg.prediction_type,
        "timestep_spacing": "trailing",
    }


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def shipped_base_dir() -> Path:
    """The toy English base committed as package data (``iap_rt/data/toy_base``; its record:
    ``bench/results/toy2_base.json``)."""
    from importlib import resources

    path = Path(str(resources.files("iap_rt") / "data" / "toy_base"))
    if not (path / "model_index.json").is_file():
        raise ArtifactNotFoundError(
            f"{path} is missing: this install has no shipped toy base",
            fix="reinstall iap-rt, or train one: iap-rt toy data --out D && "
            "iap-rt toy base --data D --out BASE",
        )
    return path


def load_base(path: str | os.PathLike):
    """(tokenizer, text_encoder, unet, vae, scheduler config) of a toy base directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise ArtifactNotFoundError(
                f"{path / sub} is missing: {path} is not a diffusers pipeline directory",
                fix="iap-rt toy base --data DATA --out DIR",
            )
    tok = load_tokenizer(path / "tokenizer")
    text = CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(str(path / "vae"), local_files_only=True).eval()
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text("utf-8"))
    return tok, text, unet, vae, sched
