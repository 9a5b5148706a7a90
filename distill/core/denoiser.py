"""One denoiser call for every model: D(x, sigma, cond) -> x0_hat on the VE scale x = x0 + sigma * eps.

Karras et al. 2022 (EDM), eq. 7: D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).
Each adapter below only says what c_skip, c_out, c_in and c_noise are for its kind of backbone.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dstudio.distill.core.conditioning import Conditioning, backbone_call
from dstudio.samplers.schedules import (PREDICTION_TYPES, DiscreteSigmas, append_dims, clip_x0,
                                        consistency_scalings, flow_match_alphas_cumprod, flow_sigma_to_t, x0_scalings)


# The largest gain |c_out| = |dx0 / dF| a student's backbone output may have where the student starts. An eps
# backbone's x0 = x - sigma eps has gain sigma (157 at the last step of linear betas, 2e4 of capped cosine ones,
# 14.6 for SD 1.5), and every error of a one-step student's output reaches its image multiplied by it: on a
# plain-diffusers eps / linear teacher, dmd2 quick students starting at gain 1 / 2 / 4 / 14.6 scored 20.5x / 8.4x /
# 6.9x / 17.6x the teacher's FID-mnist (speckle at 14.6; too little of the teacher's ODE at 1). So eps students start
# at the noisiest step with sigma <= 4; v, x0 and flow backbones have gain <= 1 and start at the teacher's last step.
MAX_START_GAIN = 4.0
# Flow students (rectified flow, SlimFlow) start from unit noise read at their noisiest level, where the teacher's
# states still hold alpha = 1 / sqrt(1 + sigma^2) of the image (0.24 at sigma 4, 0.068 at 14.62): on the eps / linear
# zoo teacher their quick students scored 12.0x the teacher's FID-mnist at gain 14.62 against 30.4x at 4 (both with
# reflow times below the start trained, no perceptual distance; 4.3x at 14.62 with the teacher-feature distance).
FLOW_START_GAIN = 14.62  # SD 1.5's last step


@dataclass
class StartOptions:
    """The method-config key of where students start (`--set method.start_gain=G`)."""

    start_gain: float = MAX_START_GAIN  # 14.62: SD 1.5 students start at t = 999, as DMD2's SD recipe


def call_backbone(model: nn.Module, x: Tensor, t: Tensor, cond) -> Tensor:
    """Call a backbone with its condition (a Conditioning, bare class labels, or None) by its family's own keywords
    (conditioning.backbone_call)."""
    return backbone_call(model, x, t, cond)


class Denoiser(nn.Module, abc.ABC):
    """Base adapter: subclasses define `scalings(sigma) -> (c_skip, c_out, c_in)` and `c_noise(sigma)`.

    `clipping` (clip_x0 kwargs, a student of a clipping teacher) clips x0 as the teacher's scheduler does when it
    samples, straight-through in backward so that a clipped pixel still learns."""

    sigma_min: float
    sigma_max: float
    clipping: dict | None = None

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @abc.abstractmethod
    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) at noise level sigma."""

    @abc.abstractmethod
    def c_noise(self, sigma: Tensor) -> Tensor:
        """The backbone's time input at noise level sigma."""

    def forward(self, x: Tensor, sigma: Tensor | float, cond=None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (append_dims(c.to(x.dtype), x.ndim) for c in self.scalings(sigma))
        F = call_backbone(self.model, x * c_in, self.c_noise(sigma).to(x.dtype), cond)
        x0 = c_skip * x + c_out * F
        if self.clipping:
            x0 = x0 + (clip_x0(x0, **self.clipping) - x0).detach()
        return x0

    def noise_scale(self, sigma) -> Tensor:
        """Pure noise on the VE scale: a unit-Gaussian state z of the model's own (VP) kind is x = z sqrt(1 + sigma^2)."""
        return (1 + torch.as_tensor(sigma, dtype=torch.float64) ** 2).sqrt()

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """1 / c_out^2: the weight under which ||D - x0||^2 is the backbone's own regression loss."""
        return self.scalings(sigma)[1].pow(-2)


class DiscreteDenoiser(Denoiser):
    """A DDPM-style UNet over t = 0..T-1 (eps-, v- or sample-prediction), seen through alphas_cumprod.

    With alpha = 1/sqrt(1 + sigma^2) the VP state is x_VP = alpha * x, and
    eps:    x0 = x - sigma * eps                                   (c_skip 1,      c_out -sigma)
    v:      x0 = alpha x_VP - sigma alpha v                        (c_skip alpha^2, c_out -sigma alpha)
    sample: x0 = F                                                 (c_skip 0,      c_out 1)
    """

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        super().__init__(model)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type '{prediction_type}' is not supported; use one of {PREDICTION_TYPES}")
        self.prediction_type, self.alphas_cumprod = prediction_type, alphas_cumprod
        self.schedule = DiscreteSigmas(alphas_cumprod)
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max

    def like(self, model: nn.Module, prediction_type: str | None = None) -> "DiscreteDenoiser":
        """The same schedule over another backbone (a fake score), in this or another parameterisation."""
        return DiscreteDenoiser(model, self.alphas_cumprod, prediction_type or self.prediction_type)

    def student(self, model: nn.Module, clipping: dict | None = None,
                max_gain: float = MAX_START_GAIN) -> "DiscreteDenoiser":
        """A student over `model`: this parameterisation and the teacher's sampling clip, so a copy of the teacher's
        backbone is exactly the teacher as sampled, at every level from its own sigma_max (`start_t`) down."""
        out = self.like(model)
        out.clipping, out.sigma_max = clipping, float(self.t_to_sigma(torch.tensor(self.start_t(max_gain))))
        return out

    def start_t(self, max_gain: float = MAX_START_GAIN) -> int:
        """The noisiest training step whose x0 gain on the backbone output |c_out| is at most `max_gain` (the least
        noisy one when none is)."""
        gain = self.scalings(self.schedule.sigmas)[1].abs()
        within = (gain <= max_gain).nonzero()
        return int(within.max()) if len(within) else 0


    def scalings(self, sigma: Tensor):
        alpha = (1 + sigma**2).rsqrt()
        c_skip, c_out = (torch.as_tensor(c, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
                         for c in x0_scalings(self.prediction_type, sigma, alpha))
        return c_skip, c_out, alpha

    def c_noise(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma).to(sigma.device)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return self.schedule.t_to_sigma(t)


class FlowMatchDenoiser(DiscreteDenoiser):
    """A flow-matching velocity model (diffusers' FlowMatchEulerDiscreteScheduler, SD3/FLUX convention) over sigma.

    x_s = (1 - s) x0 + s eps with s in (0, 1], the model sees (x_s, s T) and predicts u = eps - x0 (its Euler step is
    x_{s'} = x_s + (s' - s) u). On the VE scale s = sigma / (1 + sigma) and x_s = x / (1 + sigma), so
    x0 = x_s - s u:  c_skip = c_in = 1 / (1 + sigma), c_out = -sigma / (1 + sigma), c_noise = s T. Its discrete grid
    (step i at s_i, shifted by `shift`) is the scheduler's, seen as alphabar so that every method can index it.
    """

    def __init__(self, model: nn.Module, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps, self.shift = num_train_timesteps, shift
        nn.Module.__init__(self)
        self.model = model
        self.prediction_type = "flow"
        self.alphas_cumprod = flow_match_alphas_cumprod(num_train_timesteps, shift).float()
        self.schedule = DiscreteSigmas(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max

    def like(self, model: nn.Module, prediction_type: str | None = None) -> "DiscreteDenoiser":
        if prediction_type not in (None, "flow"):
            return DiscreteDenoiser(model, self.alphas_cumprod, prediction_type)
        return FlowMatchDenoiser(model, self.num_train_timesteps, self.shift)

    def scalings(self, sigma: Tensor):
        t = flow_sigma_to_t(sigma)
        return t, -sigma * t, t

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (1 - flow_sigma_to_t(sigma)) * self.num_train_timesteps

    def noise_scale(self, sigma) -> Tensor:
        return 1 + torch.as_tensor(sigma, dtype=torch.float64)


class WrappedDenoiser(nn.Module):
    """A Denoiser around `self.denoiser` (guidance, clipping): it keeps the inner one's noise range."""

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max


class ClippedDenoiser(WrappedDenoiser):
    """The x0 a diffusers DDPM-family scheduler would use when sampling (`clip_x0`: clip_sample or thresholding)."""

    def __init__(self, denoiser: nn.Module, clip_range: float | None = None, threshold_ratio: float | None = None,
                 max_value: float = 1.0):
        super().__init__()
        self.denoiser, self.clip_range = denoiser, clip_range
        self.threshold_ratio, self.max_value = threshold_ratio, max_value

    def forward(self, x: Tensor, sigma: Tensor | float, cond=None) -> Tensor:
        return clip_x0(self.denoiser(x, sigma, cond), self.clip_range, self.threshold_ratio, self.max_value)


class ConsistencyDenoiser(Denoiser):
    """A consistency function f(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)) with iCT's boundary scalings
    (f(x, sigma_min) = x), over a DDPM backbone that keeps its teacher's time input t(sigma)."""

    def __init__(self, model: nn.Module, schedule: DiscreteSigmas, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(model)
        self.schedule, self.sigma_data = schedule, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def scalings(self, sigma: Tensor):
        return consistency_scalings(sigma, self.sigma_data, self.sigma_min)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma).to(sigma.device)


class FlowDenoiser(Denoiser):
    """A velocity (rectified-flow) model. Project convention: x_t = t x1 + (1 - t) z, v = x1 - z, t = 1 is data.

    On the VE scale t = 1 / (1 + sigma) and x_t = t * x, so x0 = x_t + (1 - t) v:
    c_skip = c_in = 1 / (1 + sigma), c_out = sigma / (1 + sigma). `noise_at_one=True` adapts models of the
    mirror convention (diffusers' flow-matching, RF++: s = 1 - t is noise and the model predicts z - x1).
    """

    def __init__(self, model: nn.Module, time_scale: float = 1000.0, noise_at_one: bool = False,
                 sigma_min: float = 1e-3, sigma_max: float = 1e3):
        super().__init__(model)
        self.time_scale, self.noise_at_one = time_scale, noise_at_one
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def scalings(self, sigma: Tensor):
        t = flow_sigma_to_t(sigma)
        sign = -1.0 if self.noise_at_one else 1.0
        return t, sign * sigma * t, t

    def c_noise(self, sigma: Tensor) -> Tensor:
        t = flow_sigma_to_t(sigma)
        return (1 - t if self.noise_at_one else t) * self.time_scale

    def velocity(self, x_t: Tensor, t: Tensor | float, cond=None) -> Tensor:
        """v(x_t, t) = x1 - z in the project convention, from the flow state x_t directly."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        time = (1 - t if self.noise_at_one else t) * self.time_scale
        out = call_backbone(self.model, x_t, time.to(x_t.dtype), cond)
        return -out if self.noise_at_one else out


def start_state(denoiser: Denoiser, z: Tensor, sigma) -> Tensor:
    """The state a sampler starts from at noise level sigma (the teacher's terminal one for one-step students) for
    unit noise z as the pipeline draws it, on the VE scale of `denoiser` (VP: z sqrt(1 + sigma^2); flow: z (1 + sigma))."""
    return z * float(denoiser.noise_scale(float(sigma)))


def start_noise(denoiser: Denoiser, shape, sigma, generator=None, device=None) -> Tensor:
    """`start_state` of fresh unit noise of this shape."""
    return start_state(denoiser, torch.randn(tuple(shape), generator=generator, device=device), sigma)


class CFGDenoiser(WrappedDenoiser):
    """Ho & Salimans 2022, eq. 6, in x0 space: D_w = D(x, null) + w (D(x, c) - D(x, null)); w = 1 is no guidance."""

    def __init__(self, denoiser: Denoiser, guidance_scale: float, null_cond: Conditioning | Tensor):
        super().__init__()
        self.denoiser, self.guidance_scale = denoiser, guidance_scale
        if isinstance(null_cond, Conditioning):  # batch 1, moved to x's device per call
            self.null_cond = null_cond
        else:
            self.register_buffer("null_cond", torch.as_tensor(null_cond), persistent=False)

    def forward(self, x: Tensor, sigma: Tensor | float, cond=None) -> Tensor:
        if cond is None or self.guidance_scale == 1.0:
            return self.denoiser(x, sigma, cond)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if isinstance(cond, Conditioning):
            both = Conditioning.cat([cond.to(x.device), self.null_cond.to(x.device).expand(len(x))])
        else:
            both = torch.cat([cond, self.null_cond.to(cond.device).expand(cond.shape)])
        d_cond, d_null = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return d_null + self.guidance_scale * (d_cond - d_null)
