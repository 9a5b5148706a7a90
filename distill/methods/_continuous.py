"""What the continuous-time methods (scm, meanflow) share: their common config keys, a student backbone from the
teacher, and a network's derivative along a tangent, by forward-mode AD (torch.func.jvp) or by finite differences for
networks or sharding that forward-mode AD does not support (FastGen's fallback for FSDP and flash attention). Both run
in float32, outside any autocast region (FastGen's default). A clipping student's clip is straight-through
(distill/core/denoiser.py): forward-mode AD gives the unclipped x0's tangent, as backward gives its gradient, while
finite differences see the clipped values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import append_dims
from dstudio.distill.core.score import trainable_copy

JVP = Literal["autograd", "finite_difference"]


@dataclass
class ContinuousConfig:
    """The keys scm and meanflow share (each adds its `target`, times, weighting and optimiser betas)."""

    data: str = "mnist"
    init: Literal["teacher", "scratch"] = field(default="teacher", metadata={
        "cli": "--init", "help": "start from the 'teacher' or 'scratch'"})
    jvp: JVP = "autograd"            # or "finite_difference" (central differences along the same tangent)
    fd_step: float = 0.05            # finite differences move the backbone's time input by this much (a DDPM step:
                                     # sinusoids of 1000-step time need steps this small)
    guidance: float = 1.0            # distillation: classifier-free guidance on the teacher (1: none)
    lr: float = 1e-4
    grad_clip: float | None = None   # FastGen clips both at 1e6: in effect none

    def validate(self) -> None:
        require(self.fd_step > 0, f"method.fd_step={self.fd_step} must be > 0")
        require(self.guidance >= 0, f"method.guidance={self.guidance} must be >= 0")
        require(self.lr > 0, f"method.lr={self.lr} must be > 0")


def student_backbone(teacher, init: str, method: str) -> nn.Module:
    """A trainable copy of the teacher's UNet, or (init="scratch") a fresh one of its architecture; a pixel-space
    UNet2DModel teacher's only (the exports are its pipeline with a one- or two-step scheduler)."""
    kind = type(teacher.network).__name__
    require(kind == "UNet2DModel", f"{method} trains pixel-space UNet2DModel teachers (DDPMPipeline folders); "
                                   f"teacher '{teacher.source}' is a {kind}")
    net = trainable_copy(teacher.unet, "student")
    return type(net).from_config(net.config).train() if init == "scratch" else net


def time_input_step(c_noise: Callable[[Tensor], Tensor], t: Tensor, step: float) -> Tensor:
    """The time step, per sample, that moves a backbone's time input c_noise(t) by `step` (the map's local slope, by a
    float64 central difference of the map alone): finite differences then see the same change of the network's
    input at every t, whatever the parameterisation (a DDPM step grows fast with t near pure noise)."""
    t = t.double()
    slope = (c_noise(t + 1e-7) - c_noise(t - 1e-7)).abs() / 2e-7
    return (step / slope.clamp(min=step / 1e-2)).to(t.device)


def shifted(primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], step: Tensor) -> tuple[Tensor, ...]:
    """p + s d for each primal, with one step s per sample."""
    return tuple(p + append_dims(step.to(p.dtype), p.ndim) * d for p, d in zip(primals, tangents))


@torch.no_grad()
def directional_derivative(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...],
                           mode: JVP = "autograd", ahead: Tensor | None = None, behind: Tensor | None = None) -> Tensor:
    """d/ds fn(*(p + s d)) at s = 0: torch.func.jvp (attention through its math kernel, the one with forward-mode
    AD), or (fn(p + a d) - fn(p - b d)) / (a + b) with per-sample steps a = `ahead`, b = `behind` (one-sided where
    a time range ends; a = b = 0 gives 0)."""
    with torch.autocast(primals[0].device.type, enabled=False):
        if mode == "autograd":
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(fn, primals, tangents)[1]
        plus, minus = fn(*shifted(primals, tangents, ahead)), fn(*shifted(primals, tangents, -behind))
        span = append_dims((ahead + behind).to(plus.dtype), plus.ndim)
        return (plus - minus) / span.clamp(min=torch.finfo(plus.dtype).tiny)
