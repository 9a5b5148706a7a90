"""diffusers-compatible schedulers whose step lists live in their config.

`pipe.scheduler = SearchedScheduler.from_pretrained(dir)` is all a pipeline needs: `set_timesteps(n)`
applies the stored list (stock DDIMScheduler assumes uniform spacing and DDPMPipeline passes no
`timesteps=`), and `timesteps=` / `sigmas=` are accepted for `retrieve_timesteps` in Stable Diffusion.
Each `step` is the matching pure sampler of samplers.samplers, written in diffusers' (VP) variables.

Self-contained on purpose: torch, numpy and diffusers, plus relative imports of its sibling modules (which
follow the same rule), so that exports ship this file and its siblings next to a scheduler's config and plain
diffusers loads them as a custom component (dstudio.distill.core.export.ship_class).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils import logging

from .samplers import SOLVERS, discrete_timesteps, dpmpp_update, parse_solver, solver_orders, unipc_update
from .schedules import (DiscreteSigmas, alphas_cumprod_of, append_dims, check_prediction_type, check_timesteps,
                        clip_x0, clipping_of, consistency_scalings, x0_from_output)

logger = logging.get_logger(__name__)


def step_index(timesteps: torch.Tensor, timestep) -> int:
    """Where a pipeline's first `step(timestep)` call is in the set list (diffusers' convention: the first match,
    or the first step when the time step is not in the list)."""
    if not len(timesteps):
        raise ValueError("call set_timesteps before step")
    hits = (timesteps == torch.as_tensor(timestep, device=timesteps.device).to(timesteps.dtype)).nonzero()
    return int(hits[0]) if len(hits) else 0


@dataclass
class _Step:
    sigma: float
    sigma_next: float


class _PipelineCalls:
    """What diffusers pipelines call beyond set_timesteps and step: FluxPipeline's (and SDXL's) set_begin_index.
    FluxPipeline passes its own noise fractions as `sigmas=` unless the config says `use_flow_sigmas` (set for flow
    models: the steps are the scheduler's own), and `mu=`, which set_timesteps ignores (the stored steps are those
    of the size the model was distilled at)."""

    _scaled = (None, None)  # (the last tensor scale_model_input returned, the state it scaled)

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._step_index = begin_index

    def _remember(self, sample: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        self._scaled = (scaled, sample)
        return scaled

    def _state(self, sample: torch.Tensor) -> torch.Tensor:
        """The state a step is handed. DiTPipeline hands step the tensor scale_model_input returned (its loop
        reassigns latent_model_input), which then reads as the state that was scaled; other pipelines hand the state."""
        scaled, state = self._scaled
        return state if scaled is not None and sample is scaled else sample


class _DiscreteScheduler(_PipelineCalls, SchedulerMixin, ConfigMixin):
    """Shared machinery: betas, t <-> sigma, model output -> x0, step indexing, add_noise."""

    order = 1
    init_noise_sigma = 1.0
    prefix_steps = False  # whether n < len(stored list) steps may run the list's first n steps

    def _setup(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type, timesteps,
               flow_shift=None):
        self.flow_state = prediction_type == "flow"
        if self.flow_state and flow_shift is None:
            raise ValueError('prediction_type "flow" needs flow_shift (the flow-matching teacher\'s shift)')
        if not self.flow_state:
            check_prediction_type(prediction_type)
        if timesteps is not None:
            check_timesteps(timesteps, num_train_timesteps)
        self.alphas_cumprod = alphas_cumprod_of(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                                flow_shift)
        self.betas = 1 - self.alphas_cumprod / torch.cat([torch.ones(1), self.alphas_cumprod[:-1]])
        self.schedule = DiscreteSigmas(self.alphas_cumprod)
        self.timesteps = torch.tensor([], dtype=torch.long)
        self.num_inference_steps = None
        self._sigmas: list[float] = []
        self._step_index = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def default_num_inference_steps(self) -> int | None:
        stored = self.config.timesteps
        return len(stored) if stored is not None else None

    def _resolve(self, num_inference_steps, timesteps, sigmas) -> torch.Tensor:
        T = self.config.num_train_timesteps
        if timesteps is not None and sigmas is not None:
            raise ValueError("give timesteps= or sigmas=, not both")
        if sigmas is not None:
            s = torch.as_tensor(sigmas, dtype=torch.float64)
            s = s[s > 0]
            if len(s) == 0 or torch.any(s[:-1] <= s[1:]):
                raise ValueError(f"sigmas {torch.as_tensor(sigmas).tolist()} must be non-empty and strictly decreasing")
            return self.schedule.sigma_to_t(s)
        if timesteps is not None:
            return torch.tensor(check_timesteps(timesteps, T), dtype=torch.long)
        stored = self.config.timesteps
        if stored is not None:
            if self.prefix_steps and num_inference_steps is not None and 1 <= num_inference_steps < len(stored):
                return torch.tensor(stored[:num_inference_steps], dtype=torch.long)
            if num_inference_steps not in (None, len(stored)):
                logger.warning(f"{type(self).__name__} stores a {len(stored)}-step list; "
                               f"num_inference_steps={num_inference_steps} is ignored")
            return torch.tensor(stored, dtype=torch.long)
        if num_inference_steps is None:
            raise ValueError(f"{type(self).__name__} has no stored timesteps: give num_inference_steps or timesteps=")
        return torch.tensor(discrete_timesteps(T, int(num_inference_steps), self.config.timestep_spacing))

    flow_state = False  # whether the pipeline's state is the flow state x_VE / (1 + sigma) (else VP: x_VE alpha)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      **kwargs):
        t = self._resolve(num_inference_steps, timesteps, sigmas)
        self._sigmas = self.schedule.t_to_sigma(t.double()).tolist() + [self._final_sigma()]
        if self.flow_state:  # a flow-matching model's time input is s T, as in FlowMatchEulerDiscreteScheduler
            t = torch.tensor([s / (1 + s) * self.config.num_train_timesteps for s in self._sigmas[:-1]])
        self.timesteps = t.to(device)
        self.num_inference_steps = len(t)
        self._step_index = None

    def _final_sigma(self) -> float:
        return 0.0 if self.config.set_alpha_to_one else float(self.schedule.sigmas[0])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _current(self, timestep) -> _Step:
        if self._step_index is None:
            self._step_index = step_index(self.timesteps, timestep)
        i = self._step_index
        return _Step(self._sigmas[i], self._sigmas[i + 1])

    def _x0(self, model_output, sample, sigma: float) -> torch.Tensor:
        return x0_from_output(self.config.prediction_type, model_output, sample, sigma)

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        a = self.alphas_cumprod.to(original_samples.device)[timesteps.long()].to(original_samples.dtype)
        a = append_dims(a, original_samples.ndim)
        return a.sqrt() * original_samples + (1 - a).sqrt() * noise

    def _to_ve(self, sample, sigma: float):
        """The pipeline's state (VP, or the flow state) at noise level sigma -> the VE state x0 + sigma eps."""
        return sample * (1 + sigma) if self.flow_state else sample * (1 + sigma**2) ** 0.5

    def _finish(self, prev_ve, sigma_next: float, return_dict: bool):
        self._step_index += 1
        prev = prev_ve / (1 + sigma_next) if self.flow_state else prev_ve * (1 + sigma_next**2) ** -0.5
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class SearchedScheduler(_DiscreteScheduler):
    """A DDPM-family or flow-matching schedule run at an arbitrary, stored list of time steps with any solver of
    `samplers.SOLVERS`: DDIM, DPM-Solver++ 2M/3M ("dpmpp" is 2M) or UniPC-1/2/3 (bh2; "unipc" is order 2).

    `timesteps` (strictly decreasing, in [0, num_train_timesteps)) is what `set_timesteps()` applies; without it the
    scheduler falls back to a uniform list with `timestep_spacing`. With `prediction_type="flow"` and `flow_shift`
    the model is a flow-matching velocity model on FlowMatchEulerDiscreteScheduler's grid: step k is the noise
    fraction s_k = shift u / (1 + (shift - 1) u), u = (k + 1) / T, the model sees s T and the flow state (DDIM is then
    that scheduler's Euler step, which runs the same list through `set_timesteps(sigmas=[u_k])`). `clip_sample` /
    `thresholding` (DDIMScheduler's keys, copied from the teacher's scheduler) clip every solver's x0, as DPM-Solver++
    and UniPC threshold theirs (DDIM then runs as DDIMScheduler with `use_clipped_model_output=True`).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timesteps: list[int] | None = None, solver: str = "ddim",
                 set_alpha_to_one: bool = True, timestep_spacing: str = "trailing", flow_shift: float | None = None,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, use_flow_sigmas: bool = False):
        if solver not in SOLVERS:
            raise ValueError(f"solver '{solver}' is not one of {', '.join(SOLVERS)}")
        self._setup(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type, timesteps,
                    flow_shift)
        self._clipping = clipping_of(self.config) or {}
        self._reset()

    def _x0(self, model_output, sample, sigma: float) -> torch.Tensor:
        return clip_x0(super()._x0(model_output, sample, sigma), **self._clipping)

    def _reset(self):
        self._history: list[tuple[float, torch.Tensor]] = []  # (sigma, x0) of the steps taken
        self._last = None  # UniPC: the VE state the previous step started from, for its corrector

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kwargs):
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas)
        self._reset()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """One step of the pure multistep solvers (samplers.dpmpp_update / unipc_update) in diffusers' VP variables."""
        cur = self._current(timestep)
        i, sigma, sigma_next = self._step_index, cur.sigma, cur.sigma_next
        rule, order = parse_solver(self.config.solver)
        orders = solver_orders(self.num_inference_steps, order, rule)
        x_ve = self._to_ve(sample, sigma)
        x0 = self._x0(model_output, sample, sigma)
        if rule == "unipc" and self._last is not None:
            x_ve = unipc_update(self._last, self._sigmas[i - 1], sigma, self._history[-1][1], self._history[:-1],
                                orders[i - 1], x0_next=x0)
        self._last = x_ve
        update = unipc_update if rule == "unipc" else dpmpp_update
        prev = update(x_ve, sigma, sigma_next, x0, self._history, orders[i])
        self._history = [*self._history[-2:], (sigma, x0)]
        return self._finish(prev, sigma_next, return_dict)


class StudentScheduler(_DiscreteScheduler):
    """One- or few-step students (DMD2, consistency): denoise, re-noise to the next step with fresh noise, repeat.

    Without stored `timesteps`, n steps use the trailing uniform list: [999] for one step, DMD2's backward-simulation
    list [999, 749, 499, 249] for four; with a stored list, n fewer steps run its first n, and `num_inference_steps`
    sets the default. `prediction_type="consistency"` reads the model as a consistency function
    with the boundary-respecting scalings of Song et al. 2023 (`sigma_data`, `sigma_min`), like diffusers'
    LCMScheduler applies its boundary condition inside the scheduler; other students clip x0 as their teacher's
    scheduler does (DDIMScheduler's `clip_sample` / `thresholding` keys). `flow_shift` set: the steps are those of a
    flow-matching teacher (FlowMatchEulerDiscreteScheduler with that shift); with `prediction_type="flow"` the model is
    a flow-matching velocity model, sees s T and the flow state x_s = (1 - s) x0 + s eps (pure noise at s = 1).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timesteps: list[int] | None = None,
                 set_alpha_to_one: bool = True, timestep_spacing: str = "trailing",
                 sigma_data: float = 0.5, sigma_min: float = 0.002, num_inference_steps: int | None = None,
                 flow_shift: float | None = None, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 use_flow_sigmas: bool = False):
        consistency = prediction_type == "consistency"
        self._setup(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                    "sample" if consistency else prediction_type, timesteps, flow_shift)
        self._clipping = {} if consistency else clipping_of(self.config) or {}

    prefix_steps = True  # denoise-and-renoise: the first n steps of a stored list are an n-step sampler

    @property
    def default_num_inference_steps(self) -> int | None:
        return self.config.num_inference_steps or super().default_num_inference_steps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        if self.config.prediction_type != "consistency":
            return sample
        sigma = self._current(timestep).sigma  # the VP state -> c_in x_VE = x_VE / sqrt(sigma^2 + sigma_data^2)
        return self._remember(sample, sample * math.sqrt((1 + sigma**2) / (sigma**2 + self.config.sigma_data**2)))

    def _x0(self, model_output, sample, sigma: float) -> torch.Tensor:
        if self.config.prediction_type != "consistency":
            return clip_x0(super()._x0(model_output, sample, sigma), **self._clipping)
        c_skip, c_out, _ = consistency_scalings(sigma, self.config.sigma_data, self.config.sigma_min)
        return c_skip * sample * math.sqrt(1 + sigma**2) + c_out * model_output

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """Song et al. 2023 (consistency models), Algorithm 1, one step: x0 = D(x, sigma); x' = x0 + sigma' z."""
        sample = self._state(sample)
        cur = self._current(timestep)
        x0 = self._x0(model_output, sample, cur.sigma)
        prev = x0
        if cur.sigma_next > 0:
            prev = x0 + cur.sigma_next * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self._finish(prev, cur.sigma_next, return_dict)


class FlowEulerScheduler(_PipelineCalls, SchedulerMixin, ConfigMixin):
    """Euler on a rectified-flow velocity from t = 0 (noise) to t = 1 (data): x_{t'} = x_t + (t' - t) v.

    With `prediction_type="flow"` the model is a velocity network that sees `t * num_train_timesteps` (or
    `(1 - t) * num_train_timesteps` with `noise_at_one`, the mirror convention of diffusers' flow matching and RF++,
    whose models predict z - x1 = -v). With a DDPM prediction type (epsilon, v_prediction, sample) and the betas of
    its schedule, the model is a DDPM-parameterised flow student (dstudio's rectified-flow students keep their
    teacher's parameterisation): at flow time t it sees the VP state at sigma = (1 - t) / t and its DDPM time step,
    and its x0 estimate x1_hat gives v = (x1_hat - x_t) / (1 - t). `sigma_max` is the student's noisiest level (t = 0
    is read there), and x1_hat is clipped as the teacher's scheduler clips x0 (`clip_sample` / `thresholding`).
    `interval_input`: a flow-map model (MeanFlow's average velocity) also takes the step's length, from the flow time it
    is read at to the next one, as one more input channel that `scale_model_input` appends (constant over the image).
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, timesteps: list[float] | None = None,
                 num_inference_steps: int = 1, noise_at_one: bool = False, prediction_type: str = "flow",
                 beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: list[float] | None = None, sigma_max: float | None = None, clip_sample: bool = False,
                 clip_sample_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, use_flow_sigmas: bool = False, interval_input: bool = False):
        if timesteps is not None:
            ts = list(map(float, timesteps))
            if not ts or any(not 0 <= t < 1 for t in ts) or any(a >= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"flow timesteps {ts} must be non-empty, strictly increasing and in [0, 1)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        self.schedule = None
        if prediction_type != "flow":
            check_prediction_type(prediction_type)
            self.alphas_cumprod = alphas_cumprod_of(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
            self.schedule = DiscreteSigmas(self.alphas_cumprod)
        self._clipping = clipping_of(self.config) or {}
        self._ts: list[float] = []
        self._sigmas: list[float] = []
        self.timesteps = torch.tensor([])
        self._step_index = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def default_num_inference_steps(self) -> int:
        stored = self.config.timesteps
        return len(stored) if stored is not None else self.config.num_inference_steps

    def _flow_times(self, num_inference_steps, timesteps, sigmas) -> list[float]:
        if timesteps is not None:
            if self.schedule is not None:  # the model's own (DDPM) time steps
                return [1 / (1 + float(s)) for s in self.schedule.t_to_sigma(torch.as_tensor(timesteps).double())]
            ts = [float(t) / self.config.num_train_timesteps for t in timesteps]
            return [1 - t for t in ts] if self.config.noise_at_one else ts
        if sigmas is not None:
            return [1 / (1 + float(s)) if math.isfinite(float(s)) else 0.0 for s in sigmas]
        if self.config.timesteps is not None:
            return list(map(float, self.config.timesteps))
        n = int(num_inference_steps or self.config.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps={n} must be >= 1")
        return [i / n for i in range(n)]

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      **kwargs):
        ts = self._flow_times(num_inference_steps, timesteps, sigmas)
        if not ts or any(a >= b for a, b in zip(ts, ts[1:])) or any(not 0 <= t < 1 for t in ts):
            raise ValueError(f"flow times {ts} must be non-empty, strictly increasing and in [0, 1)")
        self._ts = ts + [1.0]
        if self.schedule is None:
            model_t = [(1 - t if self.config.noise_at_one else t) * self.config.num_train_timesteps for t in ts]
        else:
            lo, hi = self.schedule.sigma_min, self.config.sigma_max or self.schedule.sigma_max
            self._sigmas = [min(max((1 - t) / t, lo), hi) if t > 0 else hi for t in ts]
            model_t = self.schedule.sigma_to_t(torch.tensor(self._sigmas, dtype=torch.float64)).tolist()
        read = [1 / (1 + s) for s in self._sigmas] if self.schedule is not None else ts  # the flow times read at
        self._intervals = [t_next - t for t, t_next in zip(read, self._ts[1:])]
        self.timesteps = torch.tensor(model_t, dtype=torch.float32).to(device)
        self.num_inference_steps = len(ts)
        self._step_index = None

    def _index(self, timestep) -> int:
        if self._step_index is None:
            self._step_index = step_index(self.timesteps, timestep)
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        i = self._index(timestep)  # flow state x_t = x_VE / (1 + sigma) -> VP state, for DDPM-parameterised models
        out = sample if self.schedule is None else sample * ((1 + self._sigmas[i]) / math.sqrt(1 + self._sigmas[i]**2))
        if self.config.interval_input:  # the length of this step, as one constant channel (two-time students)
            out = torch.cat([out, torch.full_like(out[:, :1], self._intervals[i])], 1)
        return self._remember(sample, out)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """Liu et al. 2023 (rectified flow), Euler step of dx/dt = v(x, t)."""
        sample = self._state(sample)
        i = self._index(timestep)
        t, t_next = self._ts[i], self._ts[i + 1]
        if self.schedule is None:
            v = -model_output if self.config.noise_at_one else model_output
        else:
            sigma = self._sigmas[i]
            x_vp = sample * ((1 + sigma) / math.sqrt(1 + sigma**2))
            x1 = clip_x0(x0_from_output(self.config.prediction_type, model_output, x_vp, sigma), **self._clipping)
            v = (x1 - sample) / (1 - t)
        prev = sample + (t_next - t) * v
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
