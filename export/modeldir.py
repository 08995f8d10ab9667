"""SD pipeline directory + Chinese encoder directory -> iap-rt model directory."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from iap_rt.export.configs import EXPORT_CONFIGS
from iap_rt.export.exporter import export_onnx, raise_on_mismatch, validate_onnx

from iap_rt.errors import ArtifactNotFoundError, ConfigError
from iap_rt.fileio import ensure_dir, sha256_file, write_json_atomic
from iap_rt.modeldir import network_file, new_manifest, write_manifest
from iap_rt.specs import ModelDims
from iap_rt.tokenizer import PromptTokenizer, save_tokenizer_dir

log = logging.getLogger("iap_rt.export")

SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "steps_offset",
    "prediction_type",
    "set_alpha_to_one",
    "clip_sample",
    "timestep_spacing",
)
SD_SUBDIRS = ("unet", "vae", "scheduler")


@dataclass
class LoadedModels:
    """The PyTorch modules one export needs (fp32, eval)."""

    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizer_dir: Path
    max_length: int
    scheduler: dict
    vocab_size: int


def check_sd_dir(base: Path) -> None:
    """Raise a clear error unless ``base`` is a diffusers SD pipeline directory."""
    if not base.is_dir():
        raise ArtifactNotFoundError(
            f"base model directory {base} does not exist",
            fix="pass --base a local diffusers-format Stable Diffusion directory.",
        )
    missing = [d for d in SD_SUBDIRS if not (base / d).is_dir()]
    if missing:
        raise ArtifactNotFoundError(
            f"{base} is not a diffusers Stable Diffusion pipeline directory: "
            f"missing {', '.join(m + '/' for m in missing)}",
            fix="pass the directory that holds model_index.json, unet/, vae/, scheduler/ "
            "(e.g. a `StableDiffusionPipeline.save_pretrained` output).",
        )


def load_models(base: str | os.PathLike, encoder: str | os.PathLike) -> LoadedModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from iap_rt.train.encoder import ChineseTextEncoder

    base, encoder = Path(base), Path(encoder)
    check_sd_dir(base)
    unet = UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True).eval()
    vae = AutoencoderKL.from_pretrained(base / "vae", use_safetensors=True).eval()
    text = ChineseTextEncoder.load(encoder).eval()
    d = unet.config.cross_attention_dim
    if text.output_dim != d:
        raise ConfigError(
            f"the Chinese encoder in {encoder} outputs width {text.output_dim} but the UNet's "
            f"cross_attention_dim is {d}, and the encoder has no projection to {d}",
            fix=f"train the encoder against this base (iap-rt train --base {base}), which "
            "adds the projection.",
        )
    if not (encoder / "tokenizer.json").is_file():
        raise ArtifactNotFoundError(
            f"{encoder / 'tokenizer.json'} is missing",
            fix="use the chinese_encoder/ directory written by `iap-rt train`.",
        )
    sched = json.loads((base / "scheduler" / "scheduler_config.json").read_text("utf-8"))
    return LoadedModels(
        text,
        unet,
        vae,
        encoder,
        text.max_length,
        {k: sched[k] for k in SCHEDULER_KEYS if k in sched},
        text.encoder.config.vocab_size,
    )


def export_model_dir(
    base: str | os.PathLike,
    encoder: str | os.PathLike,
    out: str | os.PathLike,
    model_id: str | None = None,
    opset: int = 18,
    default_scheduler: str = "dpm++",
) -> Path:
    """Minimal fp32 export of all three networks into a model directory (validated)."""
    out = ensure_dir(out)
    m = load_models(base, encoder)
    dims = ModelDims(
        text_max_length=m.max_length,
        cross_attention_dim=m.unet.config.cross_attention_dim,
        latent_channels=m.unet.config.in_channels,
        vae_scale_factor=2 ** (len(m.vae.config.block_out_channels) - 1),
    )
    from diffusers.models.attention_processor import AttnProcessor

    m.unet.set_attn_processor(AttnProcessor())
    modules = {"text_encoder": m.text_encoder, "unet": m.unet, "vae_decoder": m.vae}
    manifest = new_manifest(
        model_id or out.name,
        dims,
        base_model=str(base),
        vae={"scaling_factor": float(m.vae.config.scaling_factor)},
        default_scheduler=default_scheduler,
        tool_versions=_versions(),
    )
    all_mismatches = []
    for name, module in modules.items():
        cfg = EXPORT_CONFIGS[name]
        wrapped = cfg.wrap(module)
        path = out / network_file(name)
        t0 = time.perf_counter()
        export_onnx(wrapped, cfg, dims, "fp32", path, opset, vocab_size=m.vocab_size)
        report, mism = validate_onnx(wrapped, cfg, dims, "fp32", path, vocab_size=m.vocab_size)
        all_mismatches += mism
        manifest["networks"][name] = {
            "file": path.name,
            "precision": "fp32",
            "opset": opset,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "export_s": round(time.perf_counter() - t0, 2),
            "validation": report,
        }
    raise_on_mismatch(all_mismatches)
    tok = (
        PromptTokenizer.from_dir(m.tokenizer_dir)
        if (m.tokenizer_dir / "iap_tokenizer.json").is_file()
        else None
    )
    from tokenizers import Tokenizer

    save_tokenizer_dir(
        out / "tokenizer",
        tok.tokenizer if tok else Tokenizer.from_file(str(m.tokenizer_dir / "tokenizer.json")),
        m.max_length,
    )
    write_json_atomic(out / "scheduler.json", m.scheduler)
    write_manifest(out, manifest)
    return out


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("iap-rt", "torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
