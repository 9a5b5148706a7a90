"""Noise-level grids and the discrete-time <-> sigma map of DDPM-style teachers.

Every noise level in dstudio is an EDM / VE `sigma` (x = x0 + sigma * eps). A discrete DDPM teacher
with cumulative products `alphas_cumprod` (alphabar_t) lives on that scale through
sigma_t = sqrt((1 - alphabar_t) / alphabar_t) and x_VE = x_VP / sqrt(alphabar_t).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # a DDPM backbone's outputs, as diffusers names them


def x0_scalings(prediction_type: str, sigma, alpha):
    """(c_skip, c_out) with x0 = c_skip x_VE + c_out F for a DDPM backbone's output F at noise level sigma,
    alpha = 1 / sqrt(1 + sigma^2) (EDM eq. 7's outer scalings): eps (1, -sigma), v (alpha^2, -sigma alpha),
    sample (0, 1). Floats or tensors, as given."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return alpha**2, -sigma * alpha
    return 0.0, 1.0


def x0_from_output(prediction_type: str, model_output, sample, sigma: float) -> torch.Tensor:
    """A DDPM model's output at VP state `sample` and noise level sigma -> x0 (DiscreteDenoiser's scalings); "flow":
    a flow-matching velocity u = eps - x0 at the flow state x_s, s = sigma / (1 + sigma): x0 = x_s - s u."""
    if prediction_type == "flow":
        return sample - sigma / (1 + sigma) * model_output
    alpha = (1 + sigma**2) ** -0.5
    c_skip, c_out = x0_scalings(prediction_type, sigma, alpha)
    return c_skip * (sample / alpha) + c_out * model_output


MIN_ALPHABAR = 1e-10  # sigma <= 1e5: a terminal-SNR-0 step is read as pure noise at this finite sigma


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """x with trailing singleton dimensions up to `ndim` (per-sample scalars against images)."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def clipping_of(config) -> dict | None:
    """A diffusers DDPM/DDIM scheduler config's x0 clipping as `clip_x0` kwargs: dynamic thresholding if set, else
    clip_sample to [-clip_sample_range, range] (None: no clipping)."""
    if config.get("thresholding"):
        return {"threshold_ratio": float(config.get("dynamic_thresholding_ratio", 0.995)),
                "max_value": float(config.get("sample_max_value", 1.0))}
    if config.get("clip_sample"):
        return {"clip_range": float(config.get("clip_sample_range", 1.0))}
    return None


def clip_x0(x0: Tensor, clip_range: float | None = None, threshold_ratio: float | None = None,
            max_value: float = 1.0) -> Tensor:
    """x0 as diffusers' DDPM/DDIM step uses it: dynamic thresholding (Saharia et al. 2022, sec. 2.3: s =
    max(1, quantile(|x0|, ratio)) clamped to max_value, x0 <- clip(x0, s) / s), else clip_sample to [-r, r]."""
    if threshold_ratio is not None:
        s = torch.quantile(x0.abs().flatten(1).float(), threshold_ratio, dim=1)
        s = append_dims(s.clamp(1, max_value).to(x0.dtype), x0.ndim)
        return torch.maximum(torch.minimum(x0, s), -s) / s
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0


def flow_match_alphas_cumprod(num_train_timesteps: int, shift: float = 1.0) -> Tensor:
    """diffusers' FlowMatchEulerDiscreteScheduler grid as a DDPM-style alphabar: step i has noise fraction
    s_i = shift u / (1 + (shift - 1) u), u = (i + 1) / T, i.e. x_s = (1 - s) x0 + s eps = x_VE / (1 + sigma) with
    sigma = s / (1 - s); alphabar = 1 / (1 + sigma^2) (0 at the last step, s = 1: pure noise)."""
    u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    s = shift * u / (1 + (shift - 1) * u)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def is_flow_matching(config) -> bool:
    """Whether a scheduler config is a flow-matching one (FlowMatchEulerDiscreteScheduler's: a shift, no betas)."""
    return "beta_schedule" not in config and "shift" in config


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> torch.Tensor:
    """The beta schedules of diffusers' DDPM/DDIM schedulers, computed the same way (float32)."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"beta_schedule '{beta_schedule}' is not one of linear, scaled_linear, squaredcos_cap_v2")


def alphas_cumprod_of(num_train_timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02,
                      beta_schedule: str = "linear", trained_betas=None, flow_shift: float | None = None) -> Tensor:
    """alphabar_t of a scheduler config, as the exported schedulers hold it: the cumulative product of diffusers'
    betas (float32), or the flow-matching grid of `flow_shift` (float32)."""
    if flow_shift is not None:
        return flow_match_alphas_cumprod(num_train_timesteps, flow_shift).float()
    return torch.cumprod(1.0 - make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas), 0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - alphabar_t) / alphabar_t) for every training step t (DDPM -> VE)."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (EDM), eq. 5: n noise levels from sigma_max down to sigma_min, no trailing 0."""
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class DiscreteSigmas:
    """The sigma grid of a discrete teacher and the continuous map t <-> sigma between its points.

    Interpolates log(sigma) linearly in t, as k-diffusion's DiscreteSchedule does, so both directions
    are exact on integer t and monotone in between.
    """

    def __init__(self, alphas_cumprod: Tensor):
        # Zero-terminal-SNR schedules end at alphabar = 0 (sigma = inf): keep the grid finite.
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double().clamp(min=MIN_ALPHABAR))
        self.log_sigmas = self.sigmas.log()

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        ls = self.log_sigmas.to(t.device)
        return ((1 - w) * ls[lo] + w * ls[hi]).exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        ls = self.log_sigmas
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log().to(ls.device)
        log_sigma = log_sigma.clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_sigma.reshape(-1).contiguous()).clamp(1, len(ls) - 1).reshape(log_sigma.shape)
        lo = hi - 1
        w = (log_sigma - ls[lo]) / (ls[hi] - ls[lo])
        return lo + w

    def timesteps_to_sigmas(self, timesteps) -> Tensor:
        return self.t_to_sigma(torch.as_tensor(timesteps, dtype=torch.float64))


def flow_sigma_to_t(sigma: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + sigma)


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def consistency_scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Song & Dhariwal 2023 (iCT), sec. 3 / Song et al. 2023, eq. 5 with the boundary at sigma_min:
    c_skip = sd^2 / ((sigma - smin)^2 + sd^2), c_out = -sd (sigma - smin) / sqrt(sd^2 + sigma^2) (sign: dstudio's
    consistency backbones keep a v-prediction teacher's sign, F = -F_v), c_in = 1 / sqrt(sigma^2 + sd^2)."""
    sd = sigma_data
    c_skip = sd**2 / ((sigma - sigma_min) ** 2 + sd**2)
    c_out = -sd * (sigma - sigma_min) / (sd**2 + sigma**2) ** 0.5
    c_in = (sd**2 + sigma**2) ** -0.5
    return c_skip, c_out, c_in


def check_timesteps(timesteps, num_train_timesteps: int) -> list[int]:
    """A time-step list must be non-empty, strictly decreasing (so distinct) and inside [0, T)."""
    steps = [int(t) for t in timesteps]
    if any(int(t) != t for t in timesteps):
        raise ValueError(f"timesteps {list(timesteps)} must be integers")
    if not steps:
        raise ValueError("timesteps is empty: give at least one time step")
    bad = [t for t in steps if not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(f"timestep {bad[0]} is outside [0, {num_train_timesteps})")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps {steps} must be strictly decreasing with no duplicates")
    return steps


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type '{prediction_type}' is not supported; use one of {', '.join(PREDICTION_TYPES)}")
