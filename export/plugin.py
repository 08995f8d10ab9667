"""A plug-in UNet for export: a fine-tuned UNet folder, or a LoRA fused into the base's UNet.

The Chinese encoder is trained against the base's *frozen* UNet; a community fine-tune or a
style LoRA of that UNet keeps its cross-attention interface, so the same encoder drives it
without retraining (the toy v2 plug-in experiment measures how well). ``iap-rt export --unet``:

- a directory with ``config.json`` + safetensors weights (``unet/`` of a fine-tuned pipeline, or
  the pipeline directory itself) replaces ``BASE/unet``; its architecture must match, except
  an *inpainting* UNet of the base (``2C + 1`` input channels: latents, mask, masked-image
  latents; SD 1.5/2 inpainting), which makes the model directory's architecture
  ``sd-inpaint`` (``iap_rt.basemodel.unet_architecture``);
- a LoRA ``.safetensors`` file (or a directory holding ``pytorch_lora_weights.safetensors``)
  in the diffusers / PEFT format is fused into ``BASE/unet`` at export: for every adapted
  layer ``W += scale * alpha / r * B @ A``. Keys ``<module>.lora_A.weight`` / ``lora_B``
  (PEFT) or ``<module>.lora.down.weight`` / ``lora.up`` (older diffusers), with an optional
  ``unet.`` prefix; ``alpha`` from ``<module>.alpha`` or the ``lora_adapter_metadata`` that
  diffusers writes (``lora_alpha``, ``r``, ``alpha_pattern``, ``rank_pattern``; ``unet.``-prefixed
  in a pipeline's file), else ``r``.
  Text-encoder LoRA weights are ignored with a note (the Chinese encoder replaces that
  encoder); DoRA and kohya-format files are refused with a message.

Plain safetensors + torch: no peft needed (the integration test checks the result against
diffusers + peft's own loader where peft is installed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from iap_rt.basemodel import unet_architecture
from iap_rt.errors import ArtifactNotFoundError, ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))
ARCH_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "block_out_channels",
             "down_block_types", "up_block_types", "sample_size")  # fmt: skip


@dataclass(frozen=True)
class UNetSource:
    """Where the exported UNet's weights come from."""

    folder: Path  # config.json + weights: BASE/unet or a fine-tuned UNet
    kind: str = "base"  # base, finetuned, inpainting or lora
    lora: Path | None = None  # a LoRA file fused into ``folder``'s weights
    lora_scale: float = 1.0

    def files(self) -> list[Path]:
        """The files whose bytes decide the exported UNet (for the incremental hash)."""
        files = [self.folder / "config.json"]
        files += sorted(self.folder.glob("*.safetensors"))
        files += sorted(self.folder.glob("*.safetensors.index.json"))
        files = [f for f in files if f.is_file()]
        return files + ([self.lora] if self.lora else [])


def resolve_unet(base: Path, unet: str | Path | None, lora_scale: float = 1.0) -> UNetSource:
    """The UNet source of ``iap-rt export --unet`` (None: the base's own)."""
    if unet is None:
        return UNetSource(base / "unet")
    path = Path(unet)
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        path = path / "unet"  # a whole fine-tuned pipeline directory
    if path.is_dir() and (path / "config.json").is_file():
        arch = _check_arch(base / "unet" / "config.json", path / "config.json")
        return UNetSource(path, "inpainting" if arch == "sd-inpaint" else "finetuned")
    if path.is_dir() and (path / LORA_FILE).is_file():
        path = path / LORA_FILE
    if path.is_file() and path.suffix == ".safetensors":
        return UNetSource(base / "unet", "lora", path, float(lora_scale))
    raise ArtifactNotFoundError(
        f"--unet {unet}: not a UNet folder (config.json + safetensors) nor a LoRA .safetensors",
        fix="pass the unet/ folder of a fine-tuned diffusers pipeline, or a LoRA file saved "
        "by diffusers (save_lora_weights) or PEFT.",
    )


def _check_arch(base_cfg: Path, new_cfg: Path) -> str:
    """Refuse a UNet that is not a fine-tune of the base's; return its architecture."""
    a, b = (json.loads(p.read_text("utf-8")) for p in (base_cfg, new_cfg))
    arch = unet_architecture(b)
    skip = {"in_channels"} if arch == "sd-inpaint" else set()
    diff = [k for k in ARCH_KEYS if k in a and k not in skip and a.get(k) != b.get(k)]
    if diff:
        raise ConfigError(
            f"the UNet in {new_cfg.parent} is not a fine-tune of {base_cfg.parent}: "
            + ", ".join(f"{k} {b.get(k)!r} (base {a.get(k)!r})" for k in diff),
            fix="pass a UNet with the base's architecture (the Chinese encoder was trained "
            "against the base's cross-attention).",
        )
    return arch


def read_lora(path: Path) -> tuple[dict[str, tuple], list[str]]:
    """``{module name: (A, B, alpha / r)}`` of the UNet layers in a LoRA file, and the keys
    ignored (other components)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors):
        raise ConfigError(
            f"{path} is a kohya-format LoRA", fix="convert it to the diffusers format first."
        )
    conf = json.loads(meta.get("lora_adapter_metadata") or "{}")
    if any(k.startswith("unet.") for k in conf):  # a pipeline's file: "unet.r", "unet.lora_alpha"
        conf = {k.removeprefix("unet."): v for k, v in conf.items() if k.startswith("unet.")}
    if conf.get("use_dora"):
        raise ConfigError(f"{path} is a DoRA adapter; only plain LoRA can be fused here")
    ignored = [k for k in tensors if k.startswith(("text_encoder.", "text_encoder_2."))]
    weights = {k.removeprefix("unet."): v for k, v in tensors.items() if k not in ignored}
    out = {}
    for a_suffix, b_suffix in PAIRS:
        for key in [k for k in weights if k.endswith(a_suffix)]:
            module = key[: -len(a_suffix)]
            A, B = weights[key], weights.get(module + b_suffix)
            if B is None:
                raise ConfigError(f"{path}: {key} has no matching {module + b_suffix}")
            r = conf.get("rank_pattern", {}).get(module, conf.get("r", A.shape[0]))
            alpha = weights.get(module + ".alpha")
            alpha = float(alpha) if alpha is not None else None
            if alpha is None:
                alpha = conf.get("alpha_pattern", {}).get(module, conf.get("lora_alpha", r))
            out[module] = (A, B, float(alpha) / float(r))
    if not out:
        raise ConfigError(f"{path} holds no UNet LoRA weights (lora_A/lora_B or lora.down/up)")
    return out, ignored


def fuse_lora(unet, path: Path, scale: float = 1.0) -> list[str]:
    """Add ``scale * alpha / r * B @ A`` to every adapted weight of ``unet`` (in place);
    return the notes to print (ignored keys)."""
    import torch

    layers, ignored = read_lora(path)
    modules = dict(unet.named_modules())
    missing = [m for m in layers if m not in modules]
    if missing:
        raise ConfigError(
            f"{path}: {len(missing)} LoRA layer(s) are not in this UNet, e.g. {missing[0]}",
            fix="use a LoRA trained for this base model.",
        )
    with torch.no_grad():
        for name, (A, B, ratio) in layers.items():
            w = modules[name].weight  # (out, in) or (out, in, kh, kw)
            delta = (B.flatten(1).double() @ A.flatten(1).double()).reshape(w.shape)
            w += (scale * ratio * delta).to(w.dtype)
    notes = [f"LoRA: {len(layers)} UNet layers fused (scale {scale})"]
    if ignored:
        notes.append(f"LoRA: {len(ignored)} text-encoder tensors ignored (the Chinese encoder "
                     "replaces the English one)")  # fmt: skip
    return notes
