"""The four objectives and the cross-attention capture that ``pivot`` and ``full`` rest on.

An *attentive feature* is a cross-attention layer's output after ``to_out`` (before the
residual add): ``to_out(softmax(q k^T / sqrt(d)) v)`` with queries ``q`` from the image and
keys/values from the text. :class:`IapUNet` installs an :class:`IapAttnProcessor` on each
chosen ``attn2`` of a frozen UNet (per instance, via ``set_attn_processor``); during a
:meth:`IapUNet.capture` forward each one records its layer name, module, query and feature
in *execution order* (down, mid, up), which is not the order of ``unet.attn_processors``
(down, up, mid). A capture carries its own module, so a query can only ever be recomputed
through the layer that produced it.

- ``pivot``: English pass without grad, then per layer ``attend(attn, q_en, zh)`` vs feature.
- ``full``: English pass without grad + Chinese pass with grad, features paired by name.
- ``embed``: text-only distillation: the optimal-transport cost between the *sets* of Chinese
  and English encoder outputs (:func:`embed_loss`); ``embed_pos``: the older position-wise MSE.
- ``denoise``: epsilon / v prediction loss with Chinese conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iap_rt.errors import ConfigError

ALIASES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


@dataclass
class Capture:
    """One cross-attention layer's record from one UNet forward."""

    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn: nn.Module  # the diffusers Attention module that produced it
    query: torch.Tensor  # (B, heads, L, head_dim) image-side queries, after to_q / norm_q
    feature: torch.Tensor  # (B, L, C) attention output after to_out


class _StopForward(Exception):
    """Raised by the last chosen layer: the rest of the UNet cannot change the loss."""


class Recorder:
    """Collects :class:`Capture` objects from the processors while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.stop_after: int | None = None
        self.captures: list[Capture] = []

    def add(self, cap: Capture) -> None:
        self.captures.append(cap)
        if self.stop_after is not None and len(self.captures) >= self.stop_after:
            self.active = False
            raise _StopForward


def queries(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """Image tokens ``(B, L, C)`` -> multi-head queries ``(B, heads, L, head_dim)``."""
    b = hidden_states.shape[0]
    q = attn.to_q(hidden_states)  # (B, L, inner)
    q = q.view(b, -1, attn.heads, q.shape[-1] // attn.heads).transpose(1, 2)  # (B, h, L, d)
    return attn.norm_q(q) if attn.norm_q is not None else q


def attend(attn, query: torch.Tensor, context: torch.Tensor, mask=None) -> torch.Tensor:
    """Cross-attention of ``query`` over ``context`` through the frozen to_k/to_v/to_out.

    query (B, heads, L, d), context (B, S, D_text) -> attentive features (B, L, C).
    Same operations, in the same order, as diffusers' ``AttnProcessor2_0``.
    """
    b = context.shape[0]
    context = context.to(attn.to_k.weight.dtype)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    k = attn.to_k(context)  # (B, S, inner)
    v = attn.to_v(context)  # (B, S, inner)
    d = k.shape[-1] // attn.heads
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)  # (B, h, S, d)
    v = v.view(b, -1, attn.heads, d).transpose(1, 2)  # (B, h, S, d)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    o = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=0.0)  # (B,h,L,d)
    o = o.transpose(1, 2).reshape(b, -1, attn.heads * d).to(query.dtype)  # (B, L, inner)
    return attn.to_out[1](attn.to_out[0](o))  # (B, L, C)


class IapAttnProcessor:
    """A diffusers attention processor that computes ``AttnProcessor2_0``'s result and, while
    its :class:`Recorder` is active, records query and attentive feature."""

    def __init__(self, recorder: Recorder, name: str):
        self.recorder = recorder
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, L, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            bc, s = context.shape[0], context.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, s, bc)
            attention_mask = attention_mask.view(bc, attn.heads, -1, attention_mask.shape[-1])
        q = queries(attn, hidden_states)  # (B, h, L, d)
        feature = attend(attn, q, context, attention_mask)  # (B, L, C)
        out = feature
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        if self.recorder.active:
            self.recorder.add(Capture(self.name, attn, q, feature))
        return out


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention (``attn2``) modules, in module order."""
    return [
        n
        for n, m in unet.named_modules()
        if n.endswith("attn2") and getattr(m, "is_cross_attention", False)
    ]


def select_layers(unet: nn.Module, spec: str) -> list[str]:
    """``"all"`` or a comma list of ``down``/``mid``/``up`` or module-name prefixes."""
    names = cross_attention_layers(unet)
    if not names:
        raise ConfigError("the base UNet has no cross-attention (attn2) layers to align")
    if spec.strip() == "all":
        return names
    tokens = [ALIASES.get(t.strip(), t.strip()) for t in spec.split(",") if t.strip()]
    chosen, unmatched = [], []
    for t in tokens:
        hits = [n for n in names if n == t or n.startswith(t + ".")]
        unmatched += [] if hits else [t]
        chosen += [n for n in hits if n not in chosen]
    if unmatched or not chosen:
        raise ConfigError(
            f"layers {spec!r}: {unmatched or spec} match(es) no cross-attention layer",
            fix="use all, down, mid, up or prefixes of: " + ", ".join(names),
        )
    return [n for n in names if n in chosen]


class IapUNet:
    """A frozen UNet with capture processors on the chosen cross-attention layers."""

    def __init__(self, unet: nn.Module, layers: str = "all"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet = unet
        self.layers = select_layers(unet, layers)
        self.recorder = Recorder()
        chosen = set(self.layers)
        procs = {}
        for key in unet.attn_processors:
            name = key.removesuffix(".processor")
            procs[key] = (
                IapAttnProcessor(self.recorder, name) if name in chosen else AttnProcessor2_0()
            )
        unet.set_attn_processor(procs)

    def capture(self, x_t, t, context, grad: bool = False) -> list[Capture]:
        """Run the UNet on ``x_t (B,C,h,w)``, ``t (B,)``, ``context (B,S,D)`` until the last
        chosen layer; return its captures in execution order."""
        rec = self.recorder
        rec.captures, rec.active, rec.stop_after = [], True, len(self.layers)
        try:
            with torch.set_grad_enabled(grad):
                self.unet(x_t, t, context.to(self.unet.dtype), return_dict=False)
        except _StopForward:
            pass
        finally:
            rec.active, rec.stop_after = False, None
        caps, rec.captures = rec.captures, []
        if sorted(c.name for c in caps) != sorted(self.layers):
            raise RuntimeError(f"captured {[c.name for c in caps]}, expected {self.layers}")
        return caps


def layer_mse(zh: torch.Tensor, en: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Mean squared difference of one layer's features (optionally / English mean square)."""
    loss = F.mse_loss(zh.float(), en.float())
    if normalise:
        loss = loss / en.float().pow(2).mean().clamp_min(1e-12)
    return loss


def pivot_loss(iap: IapUNet, x_t, t, en, zh, normalise: bool = False):
    """IAP with one UNet pass: English pass captures q and features (no grad); the Chinese
    side recomputes each chosen layer's attention from those queries. -> (loss, per-layer)."""
    with torch.no_grad():
        caps = iap.capture(x_t, t, en)
    per_layer = [layer_mse(attend(c.attn, c.query, zh), c.feature, normalise) for c in caps]
    return torch.stack(per_layer).sum(), per_layer


def full_loss(iap: IapUNet, x_t, t, en, zh, normalise: bool = False):
    """IAP with two passes: English features (no grad) vs a grad-enabled Chinese pass."""
    with torch.no_grad():
        en_caps = iap.capture(x_t, t, en)
    zh_caps = iap.capture(x_t, t, zh, grad=True)
    if [c.name for c in en_caps] != [c.name for c in zh_caps]:
        raise RuntimeError("English and Chinese passes captured different layers")
    per_layer = [layer_mse(z.feature, e.feature, normalise) for z, e in zip(zh_caps, en_caps)]
    return torch.stack(per_layer).sum(), per_layer


def embed_pos_loss(en: torch.Tensor, zh: torch.Tensor) -> torch.Tensor:
    """MSE between encoder output sequences ``(B, S, D)``; over the shorter length when the
    tokenizers' max lengths differ (position i of one language vs position i of the other)."""
    s = min(en.shape[1], zh.shape[1])
    return F.mse_loss(zh[:, :s].float(), en[:, :s].float())


SINKHORN_EPS = 0.02  # entropic regularisation, relative to the mean pairwise cost
SINKHORN_ITERS = 100


EXP_FLOOR = -80.0  # exp() below this is < 2e-35: 0 for float32 sums, and not slow


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp`` with the shifted exponents floored at :data:`EXP_FLOOR`.

    Same value in float32 (a floored term adds < 2e-35 to a sum >= 1), but CPU ``exp`` takes a
    slow path for results that underflow (arguments below ~-87: 7-25x slower per element on
    this Zen 4), and Sinkhorn's arguments spread further below that as training sharpens the
    transport plan: unfloored, an ``embed`` step took twice the CPU time at the end of a run
    as at its start."""
    m = x.amax(dim=dim, keepdim=True)
    return (x - m).clamp_min(EXP_FLOOR).exp().sum(dim=dim).log() + m.squeeze(dim)


def embed_loss(en: torch.Tensor, zh: torch.Tensor) -> torch.Tensor:
    """Order-free distillation of the English encoder's outputs ``en (B, S_en, D)`` into the
    Chinese ones ``zh (B, S_zh, D)``: the optimal-transport cost between the two *sets* of
    output vectors, uniform mass per position (padding included), squared Euclidean cost / D.

    Why this and not position i vs position i (:func:`embed_pos_loss`): the UNet sees the text
    only through cross-attention, ``sum_j softmax(q k_j) v_j``, which depends on the context
    tokens only through their normalised empirical distribution (order and a uniform change of
    multiplicity do not matter). So this loss is 0 exactly when no query of any layer can tell
    the two captions apart, whatever the word orders and lengths; the position-wise MSE demands
    the English order and leaves Chinese positions past ``S_en`` unconstrained. The plan is
    computed by log-domain Sinkhorn iterations (Cuturi 2013) without gradient; the loss is the
    transport cost under that plan (its gradient at the optimum). Sequence-level OT across
    different tokenisations is how cross-tokenizer distillation aligns teacher and student
    (Cui et al. 2025, "Multi-Level Optimal Transport for Universal Cross-Tokenizer Knowledge
    Distillation"); the teacher is the frozen English encoder as in AltCLIP/AltDiffusion.
    """
    x, y = zh.float(), en.float()  # (B, Sz, D), (B, Se, D)
    cost = torch.cdist(x, y).pow(2)  # (B, Sz, Se)
    with torch.no_grad():
        eps = SINKHORN_EPS * cost.mean(dim=(1, 2), keepdim=True).clamp_min(1e-8)  # (B, 1, 1)
        log_a = -torch.log(torch.tensor(float(x.shape[1])))
        log_b = -torch.log(torch.tensor(float(y.shape[1])))
        f = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)  # (B, Sz)
        g = torch.zeros(y.shape[:2], dtype=x.dtype, device=x.device)  # (B, Se)
        for _ in range(SINKHORN_ITERS):
            f = eps[..., 0] * (log_a - _logsumexp((g[:, None, :] - cost) / eps, dim=2))
            g = eps[..., 0] * (log_b - _logsumexp((f[:, :, None] - cost) / eps, dim=1))
        plan = torch.exp(((f[:, :, None] + g[:, None, :] - cost) / eps).clamp_min(EXP_FLOOR))
    return (plan * cost).sum(dim=(1, 2)).mean() / x.shape[-1]


def denoise_loss(unet, scheduler, latents, noise, x_t, t, zh) -> torch.Tensor:
    """The ordinary diffusion loss with Chinese conditioning through the frozen UNet."""
    pred = unet(x_t, t, zh.to(unet.dtype), return_dict=False)[0]  # (B, C, h, w)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ConfigError(f"denoise: prediction_type {kind!r} is not supported")
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def alignment_metrics(iap: IapUNet, x_t, t, en, zh) -> dict:
    """Validation: summed alignment loss and mean cosine similarity of attentive features."""
    caps = iap.capture(x_t, t, en)
    loss, cos = 0.0, []
    for c in caps:
        f = attend(c.attn, c.query, zh).float()  # (B, L, C)
        e = c.feature.float()
        loss += F.mse_loss(f, e).item()
        cos.append(F.cosine_similarity(f.flatten(1), e.flatten(1), dim=1).mean().item())
    return {"val_loss": loss, "val_cosine": sum(cos) / len(cos)}


def objective_loss(objective: str, iap: IapUNet, scheduler, encoder, b: dict, normalise: bool):
    """Encode the Chinese captions of batch ``b`` and return (loss, per-layer losses)."""
    zh = encoder(b["zh_ids"], b["zh_mask"])  # (B, S_zh, D)
    if objective == "pivot":
        return pivot_loss(iap, b["x_t"], b["t"], b["en"], zh, normalise)
    if objective == "full":
        return full_loss(iap, b["x_t"], b["t"], b["en"], zh, normalise)
    if objective == "embed":
        return embed_loss(b["en"], zh), []
    if objective == "embed_pos":
        return embed_pos_loss(b["en"], zh), []
    if objective == "denoise":
        loss = denoise_loss(iap.unet, scheduler, b["latents"], b["noise"], b["x_t"], b["t"], zh)
        return loss, []
    raise ConfigError(f"unknown objective {objective!r}")
