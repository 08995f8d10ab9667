"""Step 1 of the export stage: check its inputs and read what it needs from their configs.

:func:`read_inputs` checks the base (a diffusers SD pipeline directory) and the Chinese
encoder directory and derives the model's dims, scheduler and image size from their configs
without loading any weights; :func:`read_previous` reads the model directory being updated
and refuses to replace anything that is not one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from iap_rt.basemodel import PICKLES, check_base_dir, unet_architecture
from iap_rt.errors import ArtifactError, ArtifactNotFoundError, ConfigError, OutputError
from iap_rt.export.plugin import UNetSource, resolve_unet
from iap_rt.memory import arch_from_configs
from iap_rt.modeldir import MANIFEST, read_manifest
from iap_rt.specs import ModelDims

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
SD_PARTS = ("unet", "vae", "scheduler")  # what the export reads of the base


def check_sd_dir(base: Path) -> None:
    """Raise a clear error unless ``base`` is a supported diffusers SD pipeline directory with
    safetensors weights for every part the export reads (configs only, nothing loaded)."""
    check_base_dir(base, SD_PARTS)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactNotFoundError(f"cannot read {path}: {e}") from e


@dataclass
class ExportInputs:
    """What the export reads, from configs only (no weights loaded)."""

    base: Path
    encoder: Path
    unet: UNetSource  # BASE/unet, a fine-tuned UNet, or BASE/unet + a LoRA (--unet)
    dims: ModelDims
    vocab_size: int
    scheduler: dict
    vae_scaling_factor: float
    image_size: int  # the UNet's native sample_size in pixels (generate's default)
    arch: dict  # the manifest's `arch`: what the runtime's memory guard estimates from
    architecture: str = "sd"  # the shape contract's architecture (iap_rt.specs): sd, sd-inpaint


def read_inputs(
    base: Path, encoder: Path, unet: str | Path | None = None, lora_scale: float = 1.0
) -> ExportInputs:
    """Check base, encoder (and a plug-in ``unet``) and derive the model's dims from their
    configs."""
    from iap_rt.train.encoder import META, load_encoder_config

    check_sd_dir(base)
    for name in ("config.json", "tokenizer.json"):
        if not (encoder / name).is_file():
            raise ArtifactNotFoundError(
                f"{encoder / name} is missing: {encoder} is not a Chinese encoder directory",
                fix="pass --encoder the chinese_encoder/ directory written by `iap-rt train`.",
            )
    unet_src = resolve_unet(base, unet, lora_scale)
    unet_cfg = _read_json(unet_src.folder / "config.json")
    vae_cfg = _read_json(base / "vae" / "config.json")
    enc_cfg = load_encoder_config(encoder / "config.json")
    meta = _read_json(encoder / META) if (encoder / META).is_file() else {}
    _check_encoder_weights(encoder, meta, enc_cfg.hidden_size)
    d = int(unet_cfg["cross_attention_dim"])
    width = meta.get("projection_dim") or enc_cfg.hidden_size
    if width != d:
        raise ConfigError(
            f"the Chinese encoder in {encoder} outputs width {width} but the UNet's "
            f"cross_attention_dim is {d}, and the encoder has no projection to {d}",
            fix=f"train the encoder against this base (iap-rt train --base {base}), which "
            "adds the projection.",
        )
    max_length = int(meta.get("max_length") or 77)
    if max_length > enc_cfg.max_position_embeddings:
        raise ConfigError(
            f"{encoder / META}: max_length {max_length} exceeds the encoder's "
            f"max_position_embeddings {enc_cfg.max_position_embeddings}",
            fix="re-train or edit max_length to at most max_position_embeddings.",
        )
    sched = _read_json(base / "scheduler" / "scheduler_config.json")
    dims = ModelDims(
        text_max_length=max_length,
        cross_attention_dim=d,
        latent_channels=int(unet_cfg.get("out_channels", 4)),
        vae_scale_factor=2 ** (len(vae_cfg.get("block_out_channels", (0,) * 4)) - 1),
        latent_multiple=2 ** (len(unet_cfg.get("block_out_channels", (0,) * 4)) - 1),
    )
    return ExportInputs(
        base,
        encoder,
        unet_src,
        dims,
        int(enc_cfg.vocab_size),
        {k: sched[k] for k in SCHEDULER_KEYS if k in sched},
        float(vae_cfg.get("scaling_factor", 0.18215)),
        int(unet_cfg.get("sample_size", 64)) * dims.vae_scale_factor,
        arch_from_configs(unet_cfg, vae_cfg),
        unet_architecture(unet_cfg),
    )


def _check_encoder_weights(encoder: Path, meta: dict, hidden: int) -> None:
    """The encoder's weights are safetensors, with the projection its metadata promises."""
    need = ["model.safetensors"]
    if meta and meta.get("projection_dim") not in (None, hidden):
        need.append("projection.safetensors")
    missing = [n for n in need if not (encoder / n).is_file()]
    if not missing:
        return
    pickles = sorted(p.name for pat in PICKLES for p in encoder.glob(pat))
    if pickles and "model.safetensors" in missing:
        raise ArtifactError(
            f"{encoder} has pickled weights only ({pickles[0]}): iap-rt reads safetensors "
            "only and has unpickled nothing",
            fix="convert them once to model.safetensors with a tool and files you trust, "
            "then rerun.",
        )
    raise ArtifactNotFoundError(
        f"{encoder / missing[0]} is missing: {encoder} is not a complete Chinese encoder",
        fix="pass --encoder the chinese_encoder/ directory `iap-rt train` wrote.",
    )


def read_previous(out: Path) -> dict | None:
    """The manifest of the model directory at ``out``, or None when there is none to build on.

    Refuses to touch a path that is a file or a non-empty directory that is not an iap-rt model
    directory (the swap in step 5 would replace it).
    """
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"output directory {out} exists and is a file",
            fix="remove the file or pass another --out.",
        )
    if not out.is_dir():
        return None
    try:
        manifest = read_manifest(out)
    except ArtifactError:
        raise OutputError(
            f"{out / MANIFEST} is not an iap-rt manifest; refusing to replace {out}",
            fix="pass --out a new or empty directory.",
        ) from None
    if manifest is None and any(out.iterdir()):
        raise OutputError(
            f"output directory {out} is not empty and is not an iap-rt model directory "
            f"(no {MANIFEST}); export replaces the whole directory",
            fix="pass --out a new or empty directory, or a model directory written by "
            "`iap-rt export`.",
        )
    return manifest  # None: nothing to build on; {}: ours but damaged, re-export everything
