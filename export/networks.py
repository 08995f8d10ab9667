"""One export config per network (the optimum ``UNetOnnxConfig`` pattern).

Each config knows its network spec (names, axes, dtypes come from ``iap_rt.specs``), which
source files decide its ONNX (for the incremental hash), how to load the PyTorch module and
wrap it so its forward matches the spec, the validation cases and the tolerance per precision.
The opset and why it is 18 live in :mod:`iap_rt.export.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from iap_rt.specs import (
    DEFAULT_ARCHITECTURE,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ModelDims,
    NetworkSpec,
    network_specs,
)

if TYPE_CHECKING:
    from iap_rt.export.inputs import ExportInputs


class TextEncoderWrapper(nn.Module):
    """input_ids, attention_mask -> text_embeddings (Chinese encoder + projection)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask)  # (N, S, D)


class UNetWrapper(nn.Module):
    """sample, timestep (float32 in every precision), encoder_hidden_states -> noise_pred (an
    inpainting UNet's sample carries the mask and masked-image latents: one tensor still)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        # diffusers casts the sinusoidal timestep embedding to sample.dtype itself
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(nn.Module):
    """latent_sample (already divided by scaling_factor) -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    """sample (an image in [-1, 1]) -> latent_mean, latent_std (diffusers'
    DiagonalGaussianDistribution: std = exp(0.5 * logvar), logvar clamped to [-30, 20]); before
    scaling_factor."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        dist = self.vae.encode(sample, return_dict=False)[0]
        return dist.mean, dist.std


# ---- sources and loaders ------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    """config + safetensors (+ shard index) of one model folder: what from_pretrained reads."""
    files = [folder / "config.json"]
    files += sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index.json"))
    return [f for f in files if f.is_file()]


def _encoder_files(src: ExportInputs) -> list[Path]:
    names = ("config.json", "model.safetensors", "projection.safetensors", "iap_encoder.json")
    return [src.encoder / n for n in names if (src.encoder / n).is_file()]


def _load_text_encoder(src: ExportInputs) -> nn.Module:
    from iap_rt.train.encoder import ChineseTextEncoder

    return ChineseTextEncoder.load(src.encoder)


def _load_unet(src: ExportInputs) -> nn.Module:
    """The base's UNet, a fine-tuned one, or the base's with a LoRA fused in (``--unet``)."""
    from diffusers import UNet2DConditionModel

    from iap_rt.export.plugin import fuse_lora

    unet = UNet2DConditionModel.from_pretrained(src.unet.folder, use_safetensors=True)
    if src.unet.lora is not None:
        fuse_lora(unet, src.unet.lora, src.unet.lora_scale)
    return unet


def _load_vae(src: ExportInputs) -> nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(src.base / "vae", use_safetensors=True)
    vae.encoder = None  # only the decoder is exported; frees its memory
    return vae


def _load_vae_encoder(src: ExportInputs) -> nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(src.base / "vae", use_safetensors=True)
    vae.decoder = None  # only the encoder is exported
    return vae


@dataclass(frozen=True)
class NetworkExportConfig:
    spec: NetworkSpec
    wrapper: type
    # source files whose bytes decide this network's ONNX: ExportInputs -> files
    sources: Callable[[ExportInputs], list[Path]]
    # ExportInputs -> fp32 module, before wrapping
    loader: Callable[[ExportInputs], nn.Module]
    # ONNX Runtime vs PyTorch fp32 passes when max|diff| <= atol + rtol * max|reference|
    atol: dict
    rtol: dict
    # two validation cases: dynamic axis values (latent h, w multiples of 8 keep SD's three
    # down-samplings exact); the first case is also the export example, so its batch is 2 and
    # h != w (torch.export specialises a size-1 dim, and must not see two axes as equal)
    cases: tuple
    # the attention has a mask Add between the scale and Softmax (BERT); SD's UNet and VAE
    # have none, so an Add there is something else (baddbmm's ``+ 0 * empty``)
    attention_mask: bool = False

    def load(self, src: ExportInputs) -> nn.Module:
        """The module as its library builds it, wrapped, eval, fp32. Validation references come
        from it before :func:`make_attention_fusable` rewrites its attention for export."""
        return self.wrapper(self.loader(src)).eval()

    def tolerance(self, precision: str, reference_absmax: float) -> float:
        return self.atol[precision] + self.rtol[precision] * reference_absmax

    def feeds(
        self, dims: ModelDims, precision: str, case_index: int, vocab_size: int
    ) -> dict[str, np.ndarray]:
        """Seeded inputs of one validation case; the first prompt's mask is half padding."""
        case = self.cases[case_index]
        feeds = self.spec.dummy_inputs(
            dims, precision, case, seed=100 + case_index, vocab_size=vocab_size
        )
        if "attention_mask" in feeds:
            mask = feeds["attention_mask"]
            mask[0, max(2, mask.shape[1] // 2) :] = 0
        return feeds

    def for_downsamples(self, downsamples: int) -> NetworkExportConfig:
        """These cases with latent sides scaled so the innermost UNet level is >= 2x2.

        A UNet that halves its input ``downsamples`` times reaches 1x1 at its innermost level
        when traced at 8x8 with 4 down-samplings (the toy base), and torch.export then
        specialises that size: the ONNX validates at the trace size and fails at any other.
        """
        need = 2 ** (downsamples + 1)
        sides = [v for c in self.cases for a, v in c.items() if a in ("h", "w")]
        if not sides or min(sides) >= need:
            return self
        k = -(-need // min(sides))  # ceil
        cases = tuple(
            {a: v * k if a in ("h", "w") else v for a, v in c.items()} for c in self.cases
        )
        return dataclasses.replace(self, cases=cases)

    def dynamic_shapes(self) -> dict:
        """dynamo ``dynamic_shapes`` naming every forward argument (from the spec)."""
        dyn = self.spec.dynamic_axes()
        return {
            t.name: {i: torch.export.Dim.DYNAMIC for i in dyn.get(t.name, {})} or None
            for t in self.spec.inputs
        }


FP_TOLERANCE = {
    # atol, rtol: fp32 differs from PyTorch by float reassociation only; fp16 is compared with
    # the fp32 PyTorch module, so it carries the fp16 rounding of every layer (measured on the
    # tiny models: ~1e-3 of a ~1-3 output range; SD 1.5 UNet ~1.4e-3)
    "atol": {"fp32": 1e-4, "fp16": 5e-3},
    "rtol": {"fp32": 1e-4, "fp16": 1e-2},
}

EXPORT_CONFIGS = {
    "text_encoder": NetworkExportConfig(
        TEXT_ENCODER,
        TextEncoderWrapper,
        sources=_encoder_files,
        loader=_load_text_encoder,
        cases=({"N": 2}, {"N": 1}),
        attention_mask=True,
        **FP_TOLERANCE,
    ),
    "unet": NetworkExportConfig(
        UNET,
        UNetWrapper,
        sources=lambda src: src.unet.files(),
        loader=_load_unet,
        cases=({"N": 2, "h": 8, "w": 16}, {"N": 1, "h": 16, "w": 8}),
        **FP_TOLERANCE,
    ),
    "vae_decoder": NetworkExportConfig(
        VAE_DECODER,
        VaeDecoderWrapper,
        sources=lambda src: _weight_files(src.base / "vae"),
        loader=_load_vae,
        cases=({"B": 2, "h": 8, "w": 16}, {"B": 1, "h": 16, "w": 8}),
        **FP_TOLERANCE,
    ),
    "vae_encoder": NetworkExportConfig(
        VAE_ENCODER,
        VaeEncoderWrapper,
        sources=lambda src: _weight_files(src.base / "vae"),
        loader=_load_vae_encoder,
        cases=({"B": 2, "h": 8, "w": 16}, {"B": 1, "h": 16, "w": 8}),
        **FP_TOLERANCE,
    ),
}


def export_config(name: str, architecture: str = DEFAULT_ARCHITECTURE) -> NetworkExportConfig:
    """The export config of ``name`` with ``architecture``'s declaration of it (an inpainting
    UNet: the same loader and cases, a 9-channel ``sample``)."""
    cfg = EXPORT_CONFIGS[name]
    spec = network_specs(architecture)[name]
    return cfg if spec == cfg.spec else dataclasses.replace(cfg, spec=spec)
