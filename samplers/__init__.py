"""Pure sampling functions over a Denoiser and diffusers-compatible scheduler classes."""
from samplers.samplers import discrete_timesteps, noise_like, sample_ddim
from samplers.schedules import (
    DiscreteSigmas,
    append_zero,
    flow_sigma_to_t,
    flow_t_to_sigma,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
    vp_scale,
)

__all__ = [
    "DiscreteSigmas", "append_zero", "discrete_timesteps", "flow_sigma_to_t", "flow_t_to_sigma",
    "karras_sigmas", "noise_like", "sample_ddim", "sigmas_from_alphas_cumprod", "vp_scale",
]
