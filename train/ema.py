"""Exponential moving average of the encoder weights."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = d * shadow + (1 - d) * weight`` after each optimizer step, with the usual
    warm-up ``d = min(decay, (1 + step) / (10 + step))``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            k: v.detach().float().clone()
            for k, v in model.state_dict().items()
            if v.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s floating-point weights with the averages."""
        own = model.state_dict()
        for k, v in self.shadow.items():
            own[k].copy_(v.to(own[k].dtype))
