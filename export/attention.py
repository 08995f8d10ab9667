"""Attention in the form TensorRT fuses.

TensorRT fuses ``MatMul(Q, Kᵀ) → [Mul/Div by the scale] → [Add mask] → Softmax → MatMul(·, V)``
into one multi-head-attention kernel (``_gemm_mha_v2``; TensorRT-RTX names it in its verbose
layer dump even when it builds without a GPU). Measured with TensorRT-RTX 1.7 and torch 2.13:

- diffusers ``AttnProcessor`` computes ``baddbmm(empty, Q, Kᵀ, beta=0, alpha=scale)``, which
  the dynamo exporter writes as ``MatMul → Mul → Add(0·empty) → Softmax``: a dead ``Add`` that
  TensorRT has to fold away (it did for a diffusers ``Attention``, it did not for a bare
  ``baddbmm``), and with static shapes the uninitialised ``empty`` becomes a graph constant;
- ``AttnProcessor2_0`` (SDPA) becomes ``Mul(Q, √s), Mul(K, √s) → MatMul → Softmax → MatMul``
  at opsets 18-21 but the ONNX ``Attention`` op at 23: the graph depends on the exporter;
- the fused kernel exists for fp16 only, and for head sizes such as 24-160 (every SD 1.5 UNet
  attention), not for 4 or 8 (the tiny test UNet) nor 512 (the SD VAE's one-head attention).

:class:`FusableAttnProcessor` writes attention out with plain ops on ``(B, heads, S, d)``
tensors, so the graph has the pattern whatever the exporter does with SDPA, and
:func:`make_attention_fusable` puts it into every ``Attention`` module of one model instance
(nothing global is patched). The Chinese encoder (transformers BERT/RoBERTa) gets the
``eager`` attention, which is the same pattern plus the mask ``Add``.
:func:`iap_rt.export.graph.find_attentions` checks an exported graph.

No upcasts are written into the graph (``upcast_attention``/``upcast_softmax``): a Cast between
the nodes blocks the fusion, and TensorRT's fused kernel accumulates fp16 softmax in fp32.
"""

from __future__ import annotations

import torch
from torch import nn


class FusableAttnProcessor:
    """diffusers attention as ``MatMul → Mul(scale) → [Add mask] → Softmax → MatMul``.

    Numerically the same as ``AttnProcessor2_0`` (same projections, norms, residual and
    rescale handling; ``attn.scale``, which is SDPA's default ``1/sqrt(d)`` in every SD model);
    only the core is written out so the exported graph keeps its shape.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # VAE attention: (B, C, H, W) -> (B, H*W, C)
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:  # the VAE's
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # self-attention attends to the (normed) hidden states, cross-attention to the context
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)  # (B, Sq, inner)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)  # (B, Sk, inner)
        value = attn.to_v(context)  # (B, Sk, inner)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, Sq, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, Sk, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, Sk, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale  # (B, h, Sq, Sk)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        hidden_states = torch.matmul(probs, value)  # (B, h, Sq, d)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout (identity in eval)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def make_attention_fusable(model: nn.Module) -> int:
    """Put the fusable attention into ``model`` (this instance only); return how many.

    diffusers ``Attention`` modules get :class:`FusableAttnProcessor`; transformers models get
    the ``eager`` attention implementation.
    """
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(FusableAttnProcessor())
            count += 1
        elif hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            module.set_attn_implementation("eager")
            count += int(getattr(module.config, "num_hidden_layers", 0))
    return count
