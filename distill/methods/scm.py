"""Continuous-time consistency models (Lu & Song 2024, sCM): sCD from any teacher read in TrigFlow; sCT as an option.

TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]. On dstudio's VE scale (x = x0 + sigma
eps) that is sigma = sigma_d tan(t) and x_VE = x_t / cos(t) (sigma_d = 0.5, the paper's, in the VE units the core
uses). The student is a copy of the teacher in the teacher's own parameterisation (Teacher.student), read as the
consistency function f(x_t, t) = D(x_t / cos t, sigma_d tan t), and the paper's F through f = cos(t) x_t - sin(t)
sigma_d F: at step 0, f is the teacher's x0 exactly. The backbone keeps the teacher's time input (its DDPM step at
sigma) so that it starts as the teacher and exports as one: the paper's c_noise(t) = t (not 1000 t) is for networks
trained in TrigFlow from scratch; the large time derivative a 1000-step input gives is what tangent normalisation
bounds. Export: StudentScheduler in the teacher's prediction type at integer steps, one step from t_max = arctan(80 /
sigma_d) (the paper's sigma_max = 80, or the student's noisiest level if lower), or two, re-noising at t_mid = 1.1
(sigma = sigma_d tan 1.1 = 0.98).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import append_dims, start_noise
from dstudio.distill.core.export import export_image_pipeline
from dstudio.distill.core.method import Batch, Distiller, Phase, register
from dstudio.distill.methods._continuous import (ContinuousConfig, directional_derivative, student_backbone,
                                                  time_input_step)
from dstudio.samplers import StudentScheduler, sample_multistep, scheduler_from_teacher


@dataclass
class SCMConfig(ContinuousConfig):
    target: Literal["teacher", "data"] = field(default="teacher", metadata={
        "cli": "--target", "help": "'teacher' (sCD: the teacher's ODE) or 'data' (sCT: the data's velocity)"})
    sigma_data: float = 0.5
    sigma_max: float = 80.0          # the paper's: sampling starts at t_max = arctan(sigma_max / sigma_d)
    p_mean: float = -1.0             # tan(t) = e^tau / sigma_d, tau ~ N(p_mean, p_std^2): the paper's CIFAR-10 values
    p_std: float = 1.4
    tangent_warmup: int = 10000      # r ramps from 0 to 1 over these steps (the paper's 10k)
    tangent_c: float = 0.1           # tangent normalisation g / (||g|| + c)
    weight_channels: int = 128       # Fourier features of the adaptive weighting w_phi(t)
    betas: tuple[float, float] = (0.9, 0.99)  # the paper's (RAdam); dstudio's Trainer runs AdamW
    mid_t: float = 1.1               # the two-step sampler's intermediate TrigFlow time

    def validate(self) -> None:
        super().validate()
        require(self.sigma_data > 0 and self.sigma_max > 0,
                f"method.sigma_data={self.sigma_data} and method.sigma_max={self.sigma_max} must be > 0")
        require(self.p_std > 0, f"method.p_std={self.p_std} must be > 0")
        require(self.tangent_warmup >= 0, f"method.tangent_warmup={self.tangent_warmup} must be >= 0")
        require(self.tangent_c > 0, f"method.tangent_c={self.tangent_c} must be > 0")
        require(self.weight_channels >= 1, f"method.weight_channels={self.weight_channels} must be >= 1")
        require(0 < self.mid_t < math.pi / 2, f"method.mid_t={self.mid_t} must lie in (0, pi/2)")


def trigflow_sigma(t: Tensor, sigma_d: float) -> Tensor:
    """sCM, sec. 3 (TrigFlow): x_t / cos t = x0 + tan(t) z, so time t is the VE noise level sigma = sigma_d tan(t)."""
    return sigma_d * torch.as_tensor(t, dtype=torch.float64).tan()


def trigflow_time(sigma: Tensor, sigma_d: float) -> Tensor:
    """The inverse map: t = arctan(sigma / sigma_d)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64) / sigma_d)


def sample_trigflow_times(n: int, p_mean: float, p_std: float, sigma_d: float, sigma_range: tuple[float, float],
                          device="cpu") -> Tensor:
    """sCM, Algorithm 1 (training times): tan(t) = e^tau / sigma_d, tau ~ N(P_mean, P_std^2); sigma = e^tau is kept
    inside the student's noise range."""
    sigma = (p_mean + p_std * torch.randn(n, dtype=torch.float64)).exp().clamp(*sigma_range)
    return trigflow_time(sigma, sigma_d).to(device)


def tangent_warmup(step: int, warmup: int) -> float:
    """sCM, sec. 4.2 (tangent warm-up): r = min(1, step / H) scales the tangent's second term."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def scm_tangent(F_minus: Tensor, dF_dt: Tensor, x_t: Tensor, dxt_dt: Tensor, t: Tensor, r: float,
                sigma_d: float) -> Tensor:
    """sCM, Algorithm 1: g = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt)."""
    cos, sin = (append_dims(v.to(x_t.dtype), x_t.ndim) for v in (t.cos(), t.sin()))
    return -cos**2 * (sigma_d * F_minus - dxt_dt) - r * cos * sin * (x_t + sigma_d * dF_dt)


def normalise_tangent(g: Tensor, c: float) -> Tensor:
    """sCM, sec. 4.2 (tangent normalisation): g / (||g|| + c), the norm over each sample."""
    return g / append_dims(g.flatten(1).norm(dim=1) + c, g.ndim)


def scm_loss(F: Tensor, F_minus: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """sCM, sec. 4.2 (adaptive weighting): e^{w(t)} / D ||F - F- - g||^2 - w(t), per sample (D: its dimension)."""
    return w.exp() * (F - F_minus - g).pow(2).flatten(1).mean(1) - w


class AdaptiveWeight(nn.Module):
    """sCM, sec. 4.2: the learned weighting w_phi(t), a linear layer on fixed Fourier features of ln(sigma_d tan t) / 4
    (EDM2's log-variance head, Karras et al. 2024), zero at initialisation (weight 1 at every t)."""

    def __init__(self, channels: int, sigma_d: float):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.sigma_d = sigma_d
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        c = (trigflow_sigma(t, self.sigma_d).log() / 4).to(self.freqs.dtype)
        return self.linear(math.sqrt(2) * torch.cos(c[:, None] * self.freqs + self.phases)).squeeze(1)


@register("scm", "scd", "sct")
class SCM(Distiller):
    """Lu & Song 2024 (sCM), Alg. 1: F(x_t, t) -> sg F + g (the normalised tangent), weighted e^{w(t)}; sCD or sCT."""

    Config = SCMConfig

    def __init__(self, config: SCMConfig, teacher=None, data=None):
        super().__init__(config, teacher, data)
        self.student = teacher.student(student_backbone(teacher, config.init, self.name))
        self.weighting = AdaptiveWeight(config.weight_channels, config.sigma_data)
        self.teacher_denoiser = teacher.for_sampling(config.guidance) if config.target == "teacher" else None
        self.sigma_range = (self.student.sigma_min, min(self.student.sigma_max, config.sigma_max))
        self.t_range = tuple(float(trigflow_time(s, config.sigma_data)) for s in self.sigma_range)

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("scm", ("student", "weighting"), loss=self.scm_objective, lr=c.lr, betas=c.betas,
                      grad_clip=c.grad_clip)]

    def _dims(self, v: Tensor, like: Tensor) -> Tensor:
        return append_dims(v.to(like.dtype), like.ndim)

    def consistency_fn(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """sCM, sec. 3: F from f(x_t, t) = cos(t) x_t - sin(t) sigma_d F, f the x0 at x_t / cos t, sd tan t."""
        sd = self.config.sigma_data
        cos, sin = self._dims(t.cos(), x_t), self._dims(t.sin(), x_t)
        f = self.student(x_t / cos, trigflow_sigma(t, sd), cond)
        return (cos * x_t - f) / (sd * sin)

    @torch.no_grad()
    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """dx_t/dt. sCD: the teacher's PF-ODE, sigma_d F_pretrain = (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) /
        sin(t); sCT: the data's, cos(t) z - sin(t) x0 (sCM, Algorithm 1)."""
        cos, sin = self._dims(t.cos(), x_t), self._dims(t.sin(), x_t)
        if self.teacher_denoiser is None:
            return cos * z - sin * x0
        x0_hat = self.teacher_denoiser(x_t / cos, trigflow_sigma(t, self.config.sigma_data), cond)
        return (cos * x_t - x0_hat) / sin

    def tangent_derivative(self, x_t: Tensor, t: Tensor, dxt_dt: Tensor, cond) -> Tensor:
        """dF-/dt along (dx_t/dt, 1): torch.func.jvp, or central differences (one-sided at the ends of the range)."""
        c = self.config
        step = time_input_step(lambda s: self.student.c_noise(trigflow_sigma(s, c.sigma_data)), t, c.fd_step)
        ahead, behind = torch.minimum(step, self.t_range[1] - t), torch.minimum(step, t - self.t_range[0])
        return directional_derivative(lambda x, s: self.consistency_fn(x, s, cond), (x_t, t),
                                      (dxt_dt, torch.ones_like(t)), c.jvp, ahead, behind)

    def scm_objective(self, batch: Batch, step: int):
        """sCM, Algorithm 1 (sCD, or sCT): tangent warm-up, tangent normalisation, adaptive weighting (sec. 4.2)."""
        c, x0, cond = self.config, batch.images, self.cond(batch.labels)
        t = sample_trigflow_times(len(x0), c.p_mean, c.p_std, c.sigma_data, self.sigma_range, x0.device)
        z = c.sigma_data * torch.randn_like(x0)
        x_t = self._dims(t.cos(), x0) * x0 + self._dims(t.sin(), x0) * z
        dxt_dt = self.velocity(x0, z, x_t, t, cond)
        F = self.consistency_fn(x_t, t, cond)
        F_minus = F.detach()
        dF_dt = self.tangent_derivative(x_t, t, dxt_dt, cond)
        r = tangent_warmup(step, c.tangent_warmup)
        g = normalise_tangent(scm_tangent(F_minus, dF_dt.to(F.dtype), x_t, dxt_dt, t, r, c.sigma_data), c.tangent_c)
        w = self.weighting(t)
        loss = scm_loss(F, F_minus, g, w).mean()
        return loss, {"scm": loss.item(), "w": w.mean().item(), "r": r}

    def export_timesteps(self, steps: int) -> list[int]:
        """The integer steps of t_max (sigma_max, or the student's noisiest level) and of t_mid, the first `steps`."""
        mid = float(trigflow_sigma(self.config.mid_t, self.config.sigma_data))
        wanted = torch.tensor([self.sigma_range[1], mid])
        ts = self.student.sigma_to_t(wanted[:steps]).round().long().tolist()
        return sorted(set(ts), reverse=True)

    def sample(self, labels: Tensor, generator: torch.Generator, steps: int = 1) -> Tensor:
        """sCM's two-step sampler (Song et al. 2023, Alg. 1): denoise, re-noise at t_mid, denoise."""
        sigmas = self.student.t_to_sigma(torch.tensor(self.export_timesteps(steps)))
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        x = start_noise(self.student, (len(labels), *self.shape), sigmas[0], generator, labels.device)
        return sample_multistep(self.student, x, sigmas.to(x.device), self.cond(labels), generator).clamp(-1, 1)

    def export(self, path) -> None:
        sched = scheduler_from_teacher(StudentScheduler, self.teacher_scheduler, timesteps=self.export_timesteps(2),
                                       num_inference_steps=1, prediction_type=self.student.prediction_type)
        export_image_pipeline(self.student.model, sched, path, method=self.name, target=self.config.target,
                              init=self.config.init)
