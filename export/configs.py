"""One export config per network (the optimum ``UNetOnnxConfig`` pattern).

Each config knows its network spec (names, axes, dtypes come from ``iap_rt.specs``), how to
wrap the PyTorch module so its forward matches the spec, the opset and why, and the
validation tolerance per precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iap_rt.specs import TEXT_ENCODER, UNET, VAE_DECODER, NetworkSpec

# opset 18: torch 2.13's dynamo exporter makes an invalid UNet at 17 (Split num_outputs);
# 18-21 work; 23 emits the ONNX Attention op, which TensorRT-RTX fails to build.
DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(18, 22)


class TextEncoderWrapper(nn.Module):
    """input_ids, attention_mask -> text_embeddings (Chinese encoder + projection)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask)  # (N, S, D)


class UNetWrapper(nn.Module):
    """sample, timestep, encoder_hidden_states -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(nn.Module):
    """latent_sample (already divided by scaling_factor) -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass(frozen=True)
class NetworkExportConfig:
    spec: NetworkSpec
    wrapper: type
    # max abs diff ONNX Runtime vs PyTorch, per precision
    atol: dict
    # two validation cases: dynamic axis values (latent h, w are multiples of 8 so SD's
    # three down-samplings stay exact)
    cases: tuple

    def wrap(self, module: nn.Module) -> nn.Module:
        return self.wrapper(module).eval()

    def dynamic_shapes(self) -> dict:
        """dynamo ``dynamic_shapes`` naming every forward argument (from the spec)."""
        dyn = self.spec.dynamic_axes()
        return {
            t.name: {i: torch.export.Dim.DYNAMIC for i in dyn.get(t.name, {})} or None
            for t in self.spec.inputs
        }


EXPORT_CONFIGS = {
    "text_encoder": NetworkExportConfig(
        TEXT_ENCODER,
        TextEncoderWrapper,
        atol={"fp32": 1e-4, "fp16": 2e-2},
        cases=({"N": 1}, {"N": 2}),
    ),
    "unet": NetworkExportConfig(
        UNET,
        UNetWrapper,
        atol={"fp32": 1e-4, "fp16": 2e-2},
        cases=({"N": 2, "h": 8, "w": 8}, {"N": 1, "h": 16, "w": 8}),
    ),
    "vae_decoder": NetworkExportConfig(
        VAE_DECODER,
        VaeDecoderWrapper,
        atol={"fp32": 1e-4, "fp16": 2e-2},
        cases=({"B": 1, "h": 8, "w": 8}, {"B": 2, "h": 8, "w": 16}),
    ),
}
