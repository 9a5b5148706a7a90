"""Pure sampling functions: sample_x(denoiser, x, sigmas, cond=None, generator=None) -> x0.

`x` starts as pure noise at sigmas[0] on the VE scale (x = z * sqrt(1 + sigma_0^2) for DDPM teachers);
`sigmas` is decreasing and ends with 0 when the last step should return the clean estimate. Flow models
are sampled in their own time t (0 = noise, 1 = data) by `sample_flow_euler`.
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


def _sigma(s: Tensor, x: Tensor) -> Tensor:
    return s.to(x.device, x.dtype)


@torch.no_grad()
def sample_ddim(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None) -> Tensor:
    """Song et al. 2021 (DDIM), eq. 12 with eta = 0, i.e. Euler on the probability-flow ODE in sigma (EDM eq. 4)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0_hat = denoiser(x, sigma, cond)
        x = x0_hat + _sigma(sigma_next / sigma, x) * (x - x0_hat)
    return x


sample_euler = sample_ddim


@torch.no_grad()
def sample_heun(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None) -> Tensor:
    """Karras et al. 2022 (EDM), Algorithm 1: Heun's second-order method, Euler on the last step to sigma = 0."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, sigma, cond)) / _sigma(sigma, x)
        x_next = x + _sigma(sigma_next - sigma, x) * d
        if sigma_next > 0:
            d_next = (x_next - denoiser(x_next, sigma_next, cond)) / _sigma(sigma_next, x)
            x_next = x + _sigma(sigma_next - sigma, x) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None) -> Tensor:
    """Lu et al. 2022 (DPM-Solver++), Algorithm 2 (2M) in lambda = -log(sigma); first order on the first and last step."""
    x0_prev = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0_hat = denoiser(x, sigma, cond)
        if sigma_next == 0:
            x = x0_hat
        else:
            h = (sigma / sigma_next).log()
            if x0_prev is not None:
                r = (sigmas[i - 1] / sigma).log() / h
                x0_hat_d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev
            else:
                x0_hat_d = x0_hat
            x = _sigma(sigma_next / sigma, x) * x - _sigma(torch.expm1(-h), x) * x0_hat_d
        x0_prev = x0_hat
    return x


@torch.no_grad()
def sample_multistep(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None) -> Tensor:
    """Song et al. 2023 (consistency models), Algorithm 1: denoise, re-noise to the next sigma with fresh noise, repeat."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = denoiser(x, sigma, cond)
        if sigma_next > 0:
            x = x + _sigma(sigma_next, x) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def sample_flow_euler(denoiser, z: Tensor, ts: Tensor, cond=None, generator=None) -> Tensor:
    """Liu et al. 2023 (rectified flow), eq. 1 solved by Euler: x_{t'} = x_t + (t' - t) v(x_t, t), t from 0 (noise) to 1."""
    x = z
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + _sigma(t_next - t, x) * denoiser.velocity(x, t, cond)
    return x


SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun, "dpmpp": sample_dpmpp_2m,
            "multistep": sample_multistep}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
