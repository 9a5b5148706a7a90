"""Exponential moving average of a network's parameters (plain tensors, or DTensors under FSDP: the copies follow
the sharding)."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up min(decay, (1+k)/(10+k))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        params = [p.detach().to(s.dtype) for s, p in zip(self.shadow, module.parameters())]
        if params:
            torch._foreach_lerp_(self.shadow, params, 1 - d)

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Swap the averaged weights in for the duration of the block."""
        live = [p.detach().clone() for p in module.parameters()]
        with torch.no_grad():
            for s, p in zip(self.shadow, module.parameters()):
                p.copy_(s)
        try:
            yield module
        finally:
            with torch.no_grad():
                for v, p in zip(live, module.parameters()):
                    p.copy_(v)

    def state_dict(self) -> list[Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[Tensor]) -> None:
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)
