"""Loading what ``iap-rt train`` works on: the frozen English SD and the trainable encoder.

:func:`check_base` and :func:`check_encoder` look at the directories only (no weights), so
a bad input fails in a second, before anything is loaded or written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from iap_rt.basemodel import check_base_dir
from iap_rt.errors import ArtifactError, ArtifactNotFoundError, ConfigError
from iap_rt.tokenizer import PromptTokenizer, bert_chinese_vocab_path, build_wordpiece_tokenizer
from iap_rt.train.encoder import META, ChineseTextEncoder, load_encoder_config

BASE_SUBDIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Frozen:
    """The frozen English SD parts (eval mode, no grad)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object  # transformers CLIP tokenizer
    scheduler: object  # diffusers DDPMScheduler (noise schedule of the base)


def check_base(base: Path) -> None:
    """Raise unless ``base`` is a supported diffusers SD pipeline directory (SD 1.x/2.x shaped:
    SDXL, SD3, Flux, ... are refused) with every part we use, weights as safetensors."""
    check_base_dir(base, BASE_SUBDIRS)


def check_encoder(path: Path) -> None:
    """Raise unless ``path`` is an encoder directory with weights and a tokenizer, or a
    config.json to initialise from."""
    if path.is_file():
        try:
            load_encoder_config(path)  # validates model_type
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ConfigError(
                f"encoder config {path} is not a JSON model config: {e}",
                fix="pass a Hugging Face config.json (model_type bert/roberta/...).",
            ) from e
        return
    if not path.is_dir():
        raise ArtifactNotFoundError(
            f"encoder {path} does not exist",
            fix="pass --encoder a local BERT/RoBERTa directory or a config.json file.",
        )
    if not (path / "config.json").is_file():
        raise ArtifactNotFoundError(
            f"encoder directory {path} has no config.json",
            fix="pass a Hugging Face encoder directory (config.json, model.safetensors, vocab).",
        )
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
        raise ArtifactNotFoundError(
            f"encoder directory {path} has no tokenizer: neither tokenizer.json nor vocab.txt",
            fix="copy the encoder's tokenizer files (tokenizer.json or vocab.txt) into it.",
        )
    if not (path / "model.safetensors").is_file():
        raise ArtifactNotFoundError(
            f"encoder directory {path} has no model.safetensors (iap-rt reads safetensors only)",
            fix="convert the weights once to model.safetensors with a trusted tool.",
        )


def load_frozen(base: Path, device, dtype: torch.dtype) -> Frozen:
    """UNet, VAE, CLIP text encoder (+ tokenizer) and noise schedule of the base."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        kw = {"use_safetensors": True, "torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(base / "unet", **kw)
        vae = AutoencoderKL.from_pretrained(base / "vae", **kw)
        text = CLIPTextModel.from_pretrained(
            base / "text_encoder", use_safetensors=True, dtype=dtype
        )
        tok = AutoTokenizer.from_pretrained(str(base / "tokenizer"))
        sched = DDPMScheduler.from_pretrained(base / "scheduler")
    except (OSError, ValueError) as e:
        raise ArtifactError(
            f"cannot load the base model from {base}: {e}",
            fix="check that the directory is a complete diffusers SD pipeline with "
            "safetensors weights.",
        ) from e
    for m in (unet, vae, text):
        m.requires_grad_(False).eval().to(device)
    return Frozen(unet, vae, text, tok, sched)


def load_encoder(
    path: Path, cross_dim: int, max_length: int | None, seed: int
) -> tuple[ChineseTextEncoder, PromptTokenizer]:
    """The trainable encoder (+ projection to ``cross_dim`` when widths differ) and its
    tokenizer. ``path``: chinese_encoder/, a plain HF directory, or a config.json."""
    torch.manual_seed(seed)  # fresh weights (config init, new projection) are seeded
    if path.is_file():
        config = load_encoder_config(path)
        s = max_length or _default_length(config)
        model = ChineseTextEncoder(config, cross_dim, s)
        tok = build_wordpiece_tokenizer(bert_chinese_vocab_path())
    else:
        meta = json.loads((path / META).read_text("utf-8")) if (path / META).is_file() else {}
        if not max_length and not meta:
            max_length = _default_length(load_encoder_config(path / "config.json"))
        model = ChineseTextEncoder.load(path, projection_dim=cross_dim, max_length=max_length)
        tok = _encoder_tokenizer(path)
    if model.output_dim != cross_dim:
        raise ConfigError(
            f"encoder {path} outputs width {model.output_dim} (its projection) but the base "
            f"UNet's cross_attention_dim is {cross_dim}",
            fix="start from the plain Hugging Face encoder, or from an encoder trained "
            "against a base of the same width.",
        )
    positions = model.encoder.config.max_position_embeddings
    if model.max_length > positions:
        raise ConfigError(
            f"max_length {model.max_length} exceeds the encoder's {positions} positions",
            fix=f"set max_length <= {positions} in [train].",
        )
    vocab = tok.get_vocab_size()
    if vocab > model.encoder.config.vocab_size:
        raise ConfigError(
            f"the tokenizer of {path} has {vocab} tokens but the encoder's vocab_size is "
            f"{model.encoder.config.vocab_size}",
            fix="use the tokenizer that belongs to the encoder (or raise vocab_size).",
        )
    pad = tok.token_to_id("[PAD]")
    return model, PromptTokenizer(tok, model.max_length, pad if pad is not None else 0)


def _encoder_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    lower = True
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        lower = bool(json.loads(cfg.read_text("utf-8")).get("do_lower_case", True))
    return build_wordpiece_tokenizer(path / "vocab.txt", lowercase=lower)


def _default_length(config) -> int:
    """77 tokens like CLIP, or fewer when the encoder has fewer positions."""
    offset = 2 if config.model_type in ("roberta", "xlm-roberta") else 0
    return min(77, config.max_position_embeddings - offset)
