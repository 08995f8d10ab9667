"""Per-sample randomness: every random draw of a training sample is a function of the run's
seed and the sample's *global position* (``pos``: how many samples the run has drawn before
it), never of the process, the micro-batch or the batch it shares with other samples.

That is what makes the trajectory depend on the global batch only (``batch_size x
grad_accum x processes``), not on how it is split: one process with ``--grad-accum 2`` and two
processes draw exactly the same numbers for every sample.

- :func:`sample_seed`: the seed of sample ``pos``; :mod:`~iap_rt.train.dataset` draws caption
  dropout, the latent sample, the noise and the timestep from it.
- The trainable encoder's dropout: :func:`install` swaps every ``nn.Dropout`` for a
  :class:`SampleDropout` and routes self-attention through :func:`sample_attention`
  (registered with transformers' ``AttentionInterface``). Inside :func:`per_sample`, row ``i``
  of every dropout mask is drawn from a generator seeded by ``(seed of row i, site)``, where a
  *site* is the dropout's module name. A mask is therefore a pure function of the sample and
  the site: the same in any batch, on any rank, and again when gradient checkpointing recomputes
  the forward. Outside :func:`per_sample` (or on modules it does not know) dropout is torch's.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ATTN_NAME = "iap_sample_dropout"
_MASK = (1 << 63) - 1
_active: list[int] | None = None  # per-row seeds of the forward in progress


def derive_seed(*parts) -> int:
    """A 60-bit seed from any tuple of values (stable across runs, processes and machines)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def sample_seed(seed: int, pos: int) -> int:
    """The seed of every random draw of the sample at global position ``pos``."""
    return derive_seed(seed, "sample", pos)


def encoder_seed(seed: int, pos: int) -> int:
    """The seed of the encoder's dropout masks for the sample at global position ``pos``."""
    return derive_seed(seed, "encoder-dropout", pos)


@contextlib.contextmanager
def per_sample(seeds: list[int]) -> Iterator[None]:
    """Draw the encoder's dropout masks row by row from ``seeds`` (one per batch row)."""
    global _active
    prev, _active = _active, [int(s) for s in seeds]
    try:
        yield
    finally:
        _active = prev


def _keep_mask(shape: torch.Size, p: float, site: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` mask of 0 and ``1/(1-p)``; row ``i`` from generator ``(seed_i, site)``."""
    if _active is None or shape[0] != len(_active):
        raise RuntimeError(
            f"per-sample dropout: batch of {shape[0]} rows but {len(_active or [])} seeds"
        )
    rows = []
    for s in _active:
        g = torch.Generator(device=like.device).manual_seed((s ^ site) & _MASK)
        rows.append(torch.rand(shape[1:], generator=g, device=like.device) >= p)
    return torch.stack(rows).to(like.dtype) / (1.0 - p)


class SampleDropout(nn.Module):
    """``nn.Dropout`` whose mask rows are per sample (see the module docstring)."""

    def __init__(self, p: float, site: int):
        super().__init__()
        self.p, self.site = float(p), int(site)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if _active is None:
            return F.dropout(x, self.p, True)
        return x * _keep_mask(x.shape, self.p, self.site, x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def sample_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """transformers attention function: SDPA, or, while training with attention dropout inside
    :func:`per_sample`, eager attention with per-sample dropout of the attention weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    site = getattr(module, "_iap_site", None)
    if dropout == 0.0 or _active is None or site is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    w = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Sq, Sk)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask, torch.finfo(w.dtype).min)
        else:
            w = w + attention_mask
    w = F.softmax(w, dim=-1)
    w = w * _keep_mask(w.shape, dropout, site, w)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()  # (B, Sq, H, d)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, sample_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install(model: nn.Module) -> bool:
    """Make a :class:`~iap_rt.train.encoder.ChineseTextEncoder`'s dropout per sample (in place; weights and state dict unchanged).

    Returns whether attention dropout is per sample too (models without transformers'
    attention interface keep torch's attention dropout; their hidden dropouts still switch)."""
    for name, mod in list(model.named_modules()):
        mod._iap_site = derive_seed("site", name)
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Dropout:
                site = derive_seed("dropout", f"{name}.{child_name}")
                setattr(mod, child_name, SampleDropout(child.p, site))
    try:
        _register()
        model.encoder.set_attn_implementation(ATTN_NAME)
    except (AttributeError, ValueError, ImportError):
        return False
    return True


def uninstall_attention(model: nn.Module) -> None:
    """Back to SDPA (what export and inference use); the dropout modules are harmless."""
    if getattr(model.encoder.config, "_attn_implementation", None) == ATTN_NAME:
        model.encoder.set_attn_implementation("sdpa")
