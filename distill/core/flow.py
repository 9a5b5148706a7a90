"""What the rectified-flow methods share: flow time distributions, a denoiser seen as a velocity field, annealing.

Project convention (METHODS.md): x_t = t x1 + (1 - t) z, v = x1 - z, t = 1 is data. On the VE scale
t = 1 / (1 + sigma) and x_t = t x, so any Denoiser D gives x1_hat(x_t, t) = D(x_t / t, (1 - t) / t) and
v(x_t, t) = (x1_hat - x_t) / (1 - t). A student initialised from a DDPM teacher is thus exactly the teacher's
probability-flow ODE at step 0 (RF++'s "diffusion initialisation").
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dstudio.distill.core.denoiser import append_dims

ANNEALING = ("linear", "exp", "cos")


def u_shaped_density(t: Tensor, a: float = 4.0) -> Tensor:
    """Lee et al. 2024 (RF++), eq. 9: p(t) = a (e^{a t} + e^{a (1 - t)}) / (2 (e^a - 1)) on [0, 1]."""
    return a * (torch.exp(a * t) + torch.exp(a * (1 - t))) / (2 * math.expm1(a))


def sample_u_shaped(n: int, a: float = 4.0, device="cpu", generator=None) -> Tensor:
    """RF++'s U-shaped times: t ~ p(t) ∝ e^{a t} by inverse CDF, then [t, 1 - t] concatenated, shuffled, n kept."""
    half = (n + 1) // 2
    u = torch.rand(half, device=device, generator=generator, dtype=torch.float64)
    t = torch.log1p(u * math.expm1(a)) / a
    both = torch.cat([t, 1 - t])
    return both[torch.randperm(len(both), device=device, generator=generator)][:n]


def sample_uniform(n: int, eps: float = 1e-3, device="cpu", generator=None) -> Tensor:
    """Liu et al. 2023 (rectified flow): t ~ U[eps, 1]."""
    return eps + (1 - eps) * torch.rand(n, device=device, generator=generator, dtype=torch.float64)


def anneal_beta(k: int, k_warm: int, kind: str = "linear") -> float:
    """Zhu et al. 2024 (SlimFlow), annealing reflow as in their reflow.py: beta goes from 1 (plain 1-RF) at k = 0
    towards 0 (reflow). linear: 1 - r; cos: (1 + cos(pi r)) / 2; r = min(1, k / k_warm); exp: e^{-k / k_warm}
    (never quite 0)."""
    if kind not in ANNEALING:
        raise ValueError(f"annealing schedule '{kind}' is not one of {', '.join(ANNEALING)}")
    if k_warm <= 0:
        return 0.0
    if kind == "exp":
        return math.exp(-k / k_warm)
    r = min(1.0, k / k_warm)
    return 1.0 - r if kind == "linear" else (1 + math.cos(math.pi * r)) / 2


def anneal_noise(z_pair: Tensor, eps: Tensor, beta: float) -> Tensor:
    """SlimFlow: z' = sqrt(1 - beta^2) z_pair + beta eps (still unit Gaussian, coupled to x1 by 1 - beta)."""
    return math.sqrt(max(0.0, 1 - beta**2)) * z_pair + beta * eps


def joint_hflip(x1: Tensor, z: Tensor, p: float = 0.5, generator=None) -> tuple[Tensor, Tensor]:
    """SlimFlow's joint horizontal flip: each (x1, z) pair is mirrored together with probability p."""
    flip = append_dims(torch.rand(len(x1), device=x1.device, generator=generator) < p, x1.ndim)
    return torch.where(flip, x1.flip(-1), x1), torch.where(flip, z.flip(-1), z)


class FlowView(nn.Module):
    """A Denoiser seen as a rectified flow in the project convention: x1_hat(x_t, t) and v(x_t, t)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        lo, hi = float(denoiser.sigma_min), float(denoiser.sigma_max)
        self.t_min, self.t_max = 1 / (1 + hi), 1 / (1 + lo)  # the flow times the backbone was trained on

    def clamp(self, t: Tensor) -> Tensor:
        return t.clamp(self.t_min, self.t_max)

    def x1_hat(self, x_t: Tensor, t: Tensor | float, cond=None) -> Tensor:
        t = self.clamp(torch.as_tensor(t, device=x_t.device, dtype=torch.float64).expand(x_t.shape[0]))
        sigma = (1 - t) / t
        return self.denoiser(x_t / append_dims(t.to(x_t.dtype), x_t.ndim), sigma, cond)

    def velocity(self, x_t: Tensor, t: Tensor | float, cond=None) -> Tensor:
        t = self.clamp(torch.as_tensor(t, device=x_t.device, dtype=torch.float64).expand(x_t.shape[0]))
        return (self.x1_hat(x_t, t, cond) - x_t) / append_dims((1 - t).to(x_t.dtype), x_t.ndim)

    def one_step(self, z: Tensor, cond=None) -> Tensor:
        """Liu et al. 2023, one-step generation x1 = z + v(z, 0) (t = 0 read as the backbone's noisiest step)."""
        return self.x1_hat(z, self.t_min, cond)

    def euler_times(self, n: int) -> Tensor:
        """n Euler steps from noise to data; the first step starts at the backbone's noisiest time."""
        ts = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        ts[0] = self.t_min
        return ts
