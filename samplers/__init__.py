"""Pure sampling functions over a Denoiser and diffusers-compatible scheduler classes."""
from dstudio.samplers.samplers import (
    SAMPLERS,
    discrete_timesteps,
    get_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_flow_euler,
    sample_heun,
    sample_multistep,
)
from dstudio.samplers.from_teacher import scheduler_from_teacher
from dstudio.samplers.schedulers import FlowEulerScheduler, SearchedScheduler, StudentScheduler
from dstudio.samplers.schedules import (
    DiscreteSigmas,
    append_zero,
    flow_sigma_to_t,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
)

__all__ = [
    "SAMPLERS", "DiscreteSigmas", "FlowEulerScheduler", "SearchedScheduler", "StudentScheduler", "append_zero",
    "discrete_timesteps", "flow_sigma_to_t", "get_sampler", "karras_sigmas",
    "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_flow_euler", "sample_heun", "sample_multistep",
    "scheduler_from_teacher", "sigmas_from_alphas_cumprod",
]
