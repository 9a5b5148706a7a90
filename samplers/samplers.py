"""Pure sampling functions: sample_x(denoiser, x, sigmas, cond=None, generator=None) -> x0.

`x` starts as pure noise at sigmas[0] on the VE scale (x = z * sqrt(1 + sigma_0^2) for DDPM teachers);
`sigmas` is decreasing and ends with 0 when the last step should return the clean estimate. Flow models
are sampled in their own time t (0 = noise, 1 = data) by `sample_flow_euler`.
"""
from __future__ import annotations

import math
from functools import partial

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


# Multistep solvers: name -> (update rule, order). "dpmpp" and "unipc" keep their stock (order 2) meaning.
SOLVERS = {"ddim": ("dpmpp", 1), "dpmpp": ("dpmpp", 2), "dpmpp-2m": ("dpmpp", 2), "dpmpp-3m": ("dpmpp", 3),
           "unipc": ("unipc", 2), "unipc-1": ("unipc", 1), "unipc-2": ("unipc", 2), "unipc-3": ("unipc", 3)}


def parse_solver(name: str) -> tuple[str, int]:
    """A solver name -> (update rule, order); ValueError naming the choices otherwise."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver '{name}': use one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def solver_orders(n: int, order: int, rule: str = "dpmpp") -> list[int]:
    """Per-step orders as diffusers' multistep schedulers use them: warm-up (step i has at most i + 1 outputs),
    first order into sigma = 0, and lowered final steps (min(order, n - i)) for UniPC always and for DPM-Solver++
    below 15 steps (`lower_order_final`)."""
    if rule == "unipc" or n < 15:
        return [min(order, i + 1, n - i) for i in range(n)]
    return [1 if i == n - 1 else min(order, i + 1) for i in range(n)]


def distinct_solvers(names, n) -> list[str]:
    """`names` less those that run the same update at every one of n steps (or at every step count in `n`, an
    iterable) as an earlier one (at 4 steps the lowered orders make DPM-Solver++ 3M run 2M's orders 1, 2, 2, 1, and
    UniPC-3 UniPC-2's)."""
    counts = [n] if isinstance(n, int) else list(n)
    seen, out = set(), []
    for name in names:
        rule, order = parse_solver(name)
        key = (rule, tuple(tuple(solver_orders(k, order, rule)) for k in counts))
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def dpmpp_update(x: Tensor, sigma: float, sigma_next: float, x0: Tensor, history, order: int) -> Tensor:
    """Lu et al. 2022 (DPM-Solver++), multistep data-prediction update of order 1-3 (Alg. 2 for 2M; the third
    order with the reference code's D1, D2 differences) on the VE scale, lambda = -log(sigma).

    `history`: the earlier (sigma_k, x0_k), most recent last; order p uses its last p - 1 entries."""
    if sigma_next == 0:
        return x0
    h = math.log(sigma / sigma_next)
    e = math.expm1(-h)  # e^{-h} - 1
    if order == 1:
        return (sigma_next / sigma) * x - e * x0
    s1, m1 = history[-1]
    r0 = math.log(s1 / sigma) / h
    d1_0 = (x0 - m1) / r0
    if order == 2:
        return (sigma_next / sigma) * x - e * (x0 + 0.5 * d1_0)
    s2, m2 = history[-2]
    r1 = math.log(s2 / s1) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return (sigma_next / sigma) * x - e * x0 + (e / h + 1) * d1 - ((e + h) / h**2 - 0.5) * d2


def _unipc_b(h: float, p: int) -> list[float]:
    """UniPC's right-hand side (Zhao et al. 2023, Thm 3.1): b_i = i! phi_{i+1}(-h) / B(h), B(h) = e^{-h} - 1 (bh2),
    with h phi_1 = e^{-h} - 1 and phi_{k+1} = phi_k / (-h) - 1 / k!."""
    hh, out, fact = -h, [], 1
    phi = B = math.expm1(hh)
    for i in range(1, p + 1):
        fact *= i
        phi = phi / hh - 1 / fact
        out.append(phi * fact / B)
    return out


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """rho from sum_k rho_k r_k^(i-1) = b_i, i = 1..len(rks) (UniPC's Vandermonde system)."""
    R = torch.tensor([[r**i for r in rks] for i in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def unipc_update(x: Tensor, sigma: float, sigma_next: float, x0: Tensor, history, order: int,
                 x0_next: Tensor | None = None) -> Tensor:
    """Zhao et al. 2023 (UniPC), one UniP-p predictor step (Alg. 2) or, given the model's `x0_next` at sigma_next,
    the UniC-p corrector (Alg. 3) of the step from sigma to sigma_next; data prediction, B(h) = e^h - 1 (bh2), on
    the VE scale. `history`: the earlier (sigma_k, x0_k), most recent last; order p uses its last p - 1 entries."""
    if sigma_next == 0 and x0_next is None:
        return x0
    h = math.log(sigma / sigma_next)
    past = history[len(history) - (order - 1):][::-1] if order > 1 else []
    rks = [math.log(sigma / s) / h for s, _ in past]  # (lambda_k - lambda_s0) / h, negative for earlier steps
    ds = [(m - x0) / r for r, (_, m) in zip(rks, past)]
    b = _unipc_b(h, order)
    if x0_next is None:
        rho = [0.5] if order == 2 else _solve(rks, b[:order - 1]) if order > 2 else []
    else:
        rks, ds = rks + [1.0], ds + [x0_next - x0]
        rho = [0.5] if order == 1 else _solve(rks, b)
    res = x0
    for r, d in zip(rho, ds):
        res = res + r * d
    return (sigma_next / sigma) * x - math.expm1(-h) * res


@torch.no_grad()
def sample_solver(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None, solver: str = "unipc") -> Tensor:
    """Any multistep solver of `SOLVERS` (DDIM, DPM-Solver++ 2M/3M, UniPC-p) over an arbitrary decreasing sigma list,
    step orders as diffusers' stock schedulers (`solver_orders`); UniPC's corrector reuses the next evaluation."""
    rule, order = parse_solver(solver)
    update = unipc_update if rule == "unipc" else dpmpp_update
    n = len(sigmas) - 1
    orders = solver_orders(n, order, rule)
    s = [float(v) for v in sigmas]
    history, x_prev = [], None
    for i in range(n):
        x0 = denoiser(x, sigmas[i], cond)
        if rule == "unipc" and i > 0:
            x = unipc_update(x_prev, s[i - 1], s[i], history[-1][1], history[:-1], orders[i - 1], x0_next=x0)
        x_prev = x
        x = update(x, s[i], s[i + 1], x0, history, orders[i])
        history = [*history[-2:], (s[i], x0)]
    return x


def sample_dpmpp_2m(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None) -> Tensor:
    """Lu et al. 2022 (DPM-Solver++), Algorithm 2 (2M) in lambda = -log(sigma); first order on the first and last step."""
    return sample_solver(denoiser, x, sigmas, cond, solver="dpmpp-2m")


def sample_dpmpp_3m(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None) -> Tensor:
    """Lu et al. 2022 (DPM-Solver++), third-order multistep, orders lowered at both ends as diffusers does."""
    return sample_solver(denoiser, x, sigmas, cond, solver="dpmpp-3m")


def sample_unipc(denoiser, x: Tensor, sigmas: Tensor, cond=None, generator=None, order: int = 2) -> Tensor:
    """Zhao et al. 2023 (UniPC), UniP-p + UniC-p with B(h) = e^h - 1 (bh2), data prediction; order 2 is diffusers' default."""
    return sample_solver(denoiser, x, sigmas, cond, solver=f"unipc-{order}")


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


SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun, "multistep": sample_multistep,
            **{name: partial(sample_solver, solver=name) for name in SOLVERS if name != "ddim"}}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
