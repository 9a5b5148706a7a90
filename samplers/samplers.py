"""Pure sampling functions: sample_x(denoiser, x, sigmas, cond=None, generator=None) -> x0.

`x` starts as pure noise at sigmas[0] on the VE scale (x = z * sqrt(1 + sigma_0^2) for DDPM teachers);
`sigmas` is decreasing and ends with 0 when the last step should return the clean estimate.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def discrete_timesteps(num_train_timesteps: int, n: int, spacing: str = "trailing") -> list[int]:
    """diffusers' uniform step lists: "trailing" starts at T-1 ([999, 749, 499, 249]); "leading" ends at 0."""
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"number of steps {n} must be in 1..{num_train_timesteps}")
    T = num_train_timesteps
    if spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)).astype(int) - 1
    elif spacing == "leading":
        steps = (np.arange(0, n) * (T // n)).round()[::-1].astype(int)
    elif spacing == "linspace":
        steps = np.linspace(0, T - 1, n).round()[::-1].astype(int)
    else:
        raise ValueError(f"spacing '{spacing}' is not one of trailing, leading, linspace")
    return [int(s) for s in steps]


@torch.no_grad()
def sample_ddim(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None) -> Tensor:
    """Song et al. 2021 (DDIM), eq. 12 with eta = 0, i.e. Euler on the probability-flow ODE in sigma (EDM eq. 4)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0_hat = denoiser(x, sigma, cond)
        x = x0_hat + (sigma_next / sigma) * (x - x0_hat)
    return x


def noise_like(shape, generator=None, device="cpu", dtype=torch.float32) -> Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
