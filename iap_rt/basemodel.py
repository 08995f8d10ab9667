"""The base model both stages start from: which diffusers pipeline directories iap-rt supports.

``iap-rt train`` and ``iap-rt export`` read an English Stable Diffusion as a local diffusers
pipeline directory. :func:`check_base_dir` looks at its configs and file names only (no weights
loaded, nothing unpickled, no torch), so an unsupported or incomplete base is refused in a
fraction of a second, before either stage does any work:

- it must be SD 1.x/2.x shaped: one CLIP text encoder and a ``UNet2DConditionModel`` with
  cross-attention and no added conditioning. SDXL (two text encoders,
  ``addition_embed_type: text_time``), SD3 / Flux / PixArt (a ``transformer/`` denoiser),
  inpainting UNets (they plug in with ``iap-rt export --unet``, see ``iap_rt.export.plugin``)
  and UNets with class, image or time-text conditioning are refused with what
  is supported and what was found;
- every component the stage will load is present, with safetensors weights (iap-rt never
  unpickles ``.bin``/``.ckpt``/``.pt`` files).
"""

from __future__ import annotations

import json
from pathlib import Path

from iap_rt.errors import ArtifactError, ArtifactNotFoundError

SUPPORTED = (
    "iap-rt supports Stable Diffusion 1.x/2.x-shaped diffusers pipelines: one CLIP text "
    "encoder and a UNet2DConditionModel with cross-attention and no added conditioning "
    "(SDXL, SD3, Flux and other conditioned UNets are not supported; an inpainting UNet plugs "
    "into a model made with its plain base: iap-rt export --unet)"
)
WEIGHTS = "diffusion_pytorch_model.safetensors"  # what diffusers' from_pretrained reads
PICKLES = ("*.bin", "*.ckpt", "*.pt", "*.pth")
# component -> the config file it must have (None: the folder itself)
CONFIGS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": None,
}
# model_index.json classes of other architectures (their directories are caught above anyway)
OTHER_PIPELINES = (
    "StableDiffusionXL", "StableDiffusion3", "Flux", "PixArt", "Kandinsky", "StableCascade",
    "Wuerstchen", "HunyuanDiT", "Lumina", "Sana", "IFPipeline", "Kolors", "AuraFlow",
)  # fmt: skip
WEIGHT_FILES = {"unet": WEIGHTS, "vae": WEIGHTS, "text_encoder": "model.safetensors"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(
            f"cannot read {path}: {e}", fix="restore the file from the original checkpoint."
        ) from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object", fix="restore the file.")
    return data


def unet_architecture(cfg: dict) -> str:
    """``sd-inpaint`` for an inpainting UNet config (``in_channels == 2 * out_channels + 1``:
    latents, mask, masked-image latents), else ``sd`` (a model directory's architecture,
    ``iap_rt.specs``)."""
    cin, cout = int(cfg.get("in_channels", 4)), int(cfg.get("out_channels", 4))
    return "sd-inpaint" if cin == 2 * cout + 1 else "sd"


def sdxl_family(base: Path, index: dict, unet: dict) -> str | None:
    """What an SDXL-class base is, named (None: not SDXL-class), from its configs: a base
    (two text encoders, the pooled vector and size/crop time ids through ``add_embedding``),
    a refiner (one text encoder, aesthetic-score time ids) or a Kolors-shaped base (a
    ChatGLM-class encoder through the UNet's ``encoder_hid_proj``)."""
    pipeline = str(index.get("_class_name") or "")
    text_time = unet.get("addition_embed_type") == "text_time"
    if pipeline.startswith("Kolors") or (text_time and unet.get("encoder_hid_dim_type")):
        return ("a Kolors-shaped base (a ChatGLM-class text encoder read through the UNet's "
                "encoder_hid_proj)")  # fmt: skip
    two = (base / "text_encoder_2").is_dir() or (base / "tokenizer_2").is_dir()
    if not (text_time or two):
        return None
    one_encoder = two and not (base / "text_encoder").is_dir()
    per_id, pooled = unet.get("addition_time_embed_dim"), 1280
    aesthetic = isinstance(per_id, int) and unet.get("projection_class_embeddings_input_dim") == (
        5 * per_id + pooled
    )  # 5 time ids (sizes, crop, aesthetic score) instead of the base's 6
    if index.get("requires_aesthetics_score") or one_encoder or aesthetic:
        return "an SDXL refiner (one text encoder, aesthetic-score time ids)"
    return "an SDXL base (two text encoders; pooled-text and size time-id conditioning)"


def unsupported_features(base: Path) -> list[str]:
    """What makes ``base`` unsupported (empty: SD 1.x/2.x shaped), from configs only; an
    SDXL-class base is named first (:func:`sdxl_family`)."""
    found = []
    index = base / "model_index.json"
    index_cfg = _read_json(index) if index.is_file() else {}
    pipeline = index_cfg.get("_class_name")
    if (base / "text_encoder_2").is_dir() or (base / "tokenizer_2").is_dir():
        found.append("a second text encoder (text_encoder_2/: SDXL)")
    if (base / "transformer").is_dir() and not (base / "unet").is_dir():
        found.append(f"a transformer denoiser instead of a UNet ({pipeline or 'SD3/Flux-style'})")
    cfg_path = base / "unet" / "config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    if cfg:
        cls = cfg.get("_class_name", "UNet2DConditionModel")
        if cls != "UNet2DConditionModel":
            found.append(f"a {cls} (not a UNet2DConditionModel)")
        if cfg.get("addition_embed_type"):
            found.append(f"added conditioning (addition_embed_type {cfg['addition_embed_type']!r})")
        if cfg.get("class_embed_type") or cfg.get("num_class_embeds"):
            found.append("class conditioning (class_embed_type / num_class_embeds)")
        if cfg.get("encoder_hid_dim") or cfg.get("encoder_hid_dim_type"):
            found.append("an encoder_hid_dim projection of the text embeddings")
        if not isinstance(cfg.get("cross_attention_dim"), int):
            found.append(f"cross_attention_dim {cfg.get('cross_attention_dim')!r} (need one int)")
        blocks = [*cfg.get("down_block_types", ()), cfg.get("mid_block_type") or ""]
        if not any("CrossAttn" in str(b) for b in blocks):
            found.append("no cross-attention layers (IAP aligns the cross-attention outputs)")
        cin, cout = cfg.get("in_channels", 4), cfg.get("out_channels", 4)
        if cin != cout:
            found.append(
                f"{cin} input but {cout} output channels (an inpainting UNet: train and export "
                "with its plain base, then plug it in with `iap-rt export --unet "
                f"{base / 'unet'}`)"
                if unet_architecture(cfg) == "sd-inpaint"
                else f"{cin} input but {cout} output channels"
            )
    if isinstance(pipeline, str) and pipeline.startswith(OTHER_PIPELINES) and not found:
        found.append(f"a {pipeline} (model_index.json)")
    family = sdxl_family(base, index_cfg, cfg)
    return [family, *found] if family else found


def check_base_dir(base: str | Path, components: tuple[str, ...], flag: str = "--base") -> None:
    """Refuse ``base`` unless it is a supported SD pipeline directory holding ``components``
    (keys of :data:`CONFIGS`), each with its config and, where it has weights, safetensors.

    Raises :class:`ArtifactNotFoundError` / :class:`ArtifactError` listing every problem."""
    base = Path(base)
    if not base.is_dir():
        why = " (it is a file)" if base.exists() else ""
        raise ArtifactNotFoundError(
            f"base model directory {base} does not exist{why}",
            fix=f"pass {flag} a local diffusers-format Stable Diffusion directory.",
        )
    found = unsupported_features(base)
    if found:
        raise ArtifactError(
            f"{base} is not a supported base model: it has {'; '.join(found)}",
            fix=SUPPORTED + ".",
        )
    missing, pickled = [], []
    for comp in components:
        folder = base / comp
        name = CONFIGS[comp]
        if not (folder / name).is_file() if name else not folder.is_dir():
            missing.append(f"{comp}/{name or ''}")
            continue
        weights = WEIGHT_FILES.get(comp)
        if weights is None or _has_safetensors(folder, weights):
            continue
        pickles = sorted(p.name for pat in PICKLES for p in folder.glob(pat))
        if pickles:
            pickled.append(f"{comp}/{pickles[0]}")
        else:
            missing.append(f"{comp}/{weights}")
    if missing:
        raise ArtifactNotFoundError(
            f"{base} is not a diffusers Stable Diffusion pipeline directory: "
            f"missing {', '.join(missing)}",
            fix="pass the directory a `StableDiffusionPipeline.save_pretrained` wrote "
            f"(with {', '.join(f'{c}/' for c in components)}).",
        )
    if pickled:
        raise ArtifactError(
            f"{base} has pickled weights only ({', '.join(pickled)}): iap-rt reads safetensors "
            "only and has unpickled nothing",
            fix="convert them once, with a tool and files you trust, e.g. "
            "`UNet2DConditionModel.from_pretrained(DIR, use_safetensors=False)"
            ".save_pretrained(DIR)` in diffusers, then rerun.",
        )


def _has_safetensors(folder: Path, name: str) -> bool:
    """``name`` or its shard index (``name.index.json``) is in ``folder``."""
    return (folder / name).is_file() or (folder / f"{name}.index.json").is_file()
