"""dstudio schedulers set up from a teacher's scheduler (not shipped with exports: the schedulers are)."""
from __future__ import annotations

import torch

from dstudio.samplers.schedules import is_flow_matching


def scheduler_from_teacher(cls, teacher_scheduler, **overrides):
    """A dstudio scheduler with the teacher scheduler's noise levels (betas, zero-SNR rescaling, or a flow-matching
    grid) and prediction type; `overrides` (e.g. the student's own prediction type) win."""
    import inspect

    config = teacher_scheduler.config
    if is_flow_matching(config):
        cfg = {"num_train_timesteps": config["num_train_timesteps"], "flow_shift": float(config["shift"]),
               "prediction_type": "flow", "noise_at_one": True, "use_flow_sigmas": True}
    else:
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")
        cfg = {k: config[k] for k in keys if k in config}
        if config.get("rescale_betas_zero_snr"):  # the betas diffusers rescaled, recovered from its alphas_cumprod
            a = teacher_scheduler.alphas_cumprod.double()
            cfg["trained_betas"] = (1 - a / torch.cat([a.new_ones(1), a[:-1]])).tolist()
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in {**cfg, **overrides}.items() if k in accepted})
