"""Mean Flows (Geng et al. 2025): a network for the average velocity u(z_t, r, t) over [r, t], trained through the
MeanFlow identity; initialised from any teacher, distilled from its velocity or trained from data.

Paper convention (used here): z_t = (1 - t) x + t eps, t = 1 is noise, v = eps - x, z_r = z_t - (t - r) u(z_t, r, t);
dstudio's flow time (t = 1 is data, distill/core/flow.py) is 1 - t. Any teacher is a velocity field through FlowView:
v(z_t, t) = (z_t - x0_hat) / t with x0_hat its x0 at sigma = t / (1 - t), x_VE = z_t / (1 - t). The student is a copy of
the teacher's UNet inside IntervalUNet2DModel (distill/core/interval_unet.py), which adds an embedding of h = t - r to
the UNet's time embedding through a zero-initialised last layer, read in the teacher's own parameterisation
(Teacher.student): at step 0, u(z_t, t, t) is the teacher's velocity exactly, and so is u at any r. Export:
FlowEulerScheduler(interval_input=True), whose Euler step with the average velocity is the MeanFlow step; 1 step by
default, `num_inference_steps=2` for two (t: 1 -> 0.5 -> 0).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import append_dims
from dstudio.distill.core.export import export_image_pipeline
from dstudio.distill.core.flow import FlowView
from dstudio.distill.core.interval_unet import IntervalUNet2DModel
from dstudio.distill.core.method import Batch, Distiller, Phase, register
from dstudio.distill.methods._continuous import (ContinuousConfig, directional_derivative, student_backbone,
                                                  time_input_step)
from dstudio.samplers import FlowEulerScheduler, scheduler_from_teacher


@dataclass
class MeanFlowConfig(ContinuousConfig):
    target: Literal["teacher", "data"] = field(default="teacher", metadata={
        "cli": "--target", "help": "'teacher' (v: the teacher's velocity) or 'data' (v = eps - x)"})
    time_mu: float = -0.4            # (r, t): logit-normal lognorm(-0.4, 1.0), the paper's default (Table 1b)
    time_sigma: float = 1.0
    ratio_r_neq_t: float = 0.25      # the share of pairs with r != t (Table 1a: 25%)
    adaptive_p: float = 1.0          # adaptive loss weight w = 1 / (||err||^2 + c)^p
    adaptive_c: float = 1e-3
    cfg_omega: float = 1.0           # CFG in training (sec. 4.2): v~ = omega v + kappa u(c) + (1 - omega - kappa)
    cfg_kappa: float = 0.0           # u(null); omega = 1, kappa = 0: off
    cfg_drop: float = 0.1            # with CFG in training: labels dropped to the null label (the paper's 10%)
    betas: tuple[float, float] = (0.9, 0.95)  # the paper's ImageNet Adam betas
    export_steps: int = 1            # the exported pipeline's default number of steps

    def validate(self) -> None:
        super().validate()
        require(self.time_sigma > 0, f"method.time_sigma={self.time_sigma} must be > 0")
        require(0 <= self.ratio_r_neq_t <= 1, f"method.ratio_r_neq_t={self.ratio_r_neq_t} must be in [0, 1]")
        require(self.adaptive_p >= 0 and self.adaptive_c > 0,
                f"method.adaptive_p={self.adaptive_p} must be >= 0 and method.adaptive_c={self.adaptive_c} > 0")
        require(0 <= self.cfg_drop < 1, f"method.cfg_drop={self.cfg_drop} must be in [0, 1)")
        require(self.export_steps >= 1, f"method.export_steps={self.export_steps} must be >= 1")

    @property
    def cfg_in_training(self) -> bool:
        return self.cfg_omega != 1.0 or self.cfg_kappa != 0.0


def sample_times(n: int, mu: float, sigma: float, ratio_r_neq_t: float, t_range: tuple[float, float],
                 device="cpu") -> tuple[Tensor, Tensor]:
    """MeanFlow, sec. 4.3 and Table 1 (ablations): two logit-normal draws, t the larger and r the smaller; r = t for
    a share 1 - ratio_r_neq_t of the pairs. Both are kept inside the student's time range."""
    s = torch.sigmoid(mu + sigma * torch.randn(n, 2, dtype=torch.float64)).clamp(*t_range)
    r, t = s.min(1).values, s.max(1).values
    r = torch.where(torch.rand(n, dtype=torch.float64) < ratio_r_neq_t, r, t)
    return r.to(device), t.to(device)


def meanflow_target(v: Tensor, du_dt: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """MeanFlow, sec. 4.1 (the MeanFlow identity as a target): u_tgt = v - (t - r) du/dt, du/dt = v d_z u + d_t u."""
    return v - append_dims((t - r).to(v.dtype), v.ndim) * du_dt


def adaptive_weight(err_sq: Tensor, p: float, c: float) -> Tensor:
    """MeanFlow, sec. 4.3 (adaptive loss weighting): w = sg(1 / (||err||^2 + c)^p)."""
    return (err_sq.detach() + c).pow(-p)


def guided_velocity(v: Tensor, u_cond: Tensor, u_null: Tensor, omega: float, kappa: float) -> Tensor:
    """MeanFlow, sec. 4.2 (CFG in training, with kappa): v~ = omega v + kappa u(z_t, t, t | c)
    + (1 - omega - kappa) u(z_t, t, t)."""
    return omega * v + kappa * u_cond + (1 - omega - kappa) * u_null


class AtInterval(nn.Module):
    """The student's flow-map UNet as its Denoiser calls it (x, t, labels), at the interval h set by `at(h)`."""

    def __init__(self, net: IntervalUNet2DModel):
        super().__init__()
        self.net, self.h = net, None

    @property
    def config(self):
        return self.net.config

    @contextlib.contextmanager
    def at(self, h: Tensor):
        self.h = h
        try:
            yield
        finally:
            self.h = None

    def forward(self, x: Tensor, t: Tensor, class_labels=None):
        return self.net(x, t, class_labels=class_labels, interval=self.h)


@register("meanflow", "mf")
class MeanFlow(Distiller):
    """Geng et al. 2025 (MeanFlow), Alg. 1: u(z_t, r, t) -> sg(v - (t - r) du/dt), adaptive L2; x = z - u(z, 0, 1)."""

    Config = MeanFlowConfig

    def __init__(self, config: MeanFlowConfig, teacher=None, data=None):
        super().__init__(config, teacher, data)
        require(not config.cfg_in_training or teacher.num_classes > 0,
                "method.cfg_omega / method.cfg_kappa (CFG in training) need a class-conditional teacher")
        net = IntervalUNet2DModel.around(student_backbone(teacher, config.init, self.name), teacher.num_train_timesteps)
        self.student = teacher.student(AtInterval(net))
        self.teacher_denoiser = teacher.for_sampling(config.guidance) if config.target == "teacher" else None
        view = FlowView(self.student)
        self.t_range = (1 - view.t_max, 1 - view.t_min)  # paper-convention times the student is trained at

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("meanflow", ("student",), loss=self.meanflow_objective, lr=c.lr, betas=c.betas,
                      grad_clip=c.grad_clip)]

    def average_velocity(self, z: Tensor, r: Tensor, t: Tensor, cond) -> Tensor:
        """u(z_t, r, t) = (z_t - x0_hat) / t, x0_hat the student's x0 at interval h = t - r (FlowView at time 1 - t)."""
        with self.student.model.at(t - r):
            return -FlowView(self.student).velocity(z, 1 - t, cond)

    @torch.no_grad()
    def velocity(self, x: Tensor, eps: Tensor, z: Tensor, t: Tensor, cond) -> Tensor:
        """v(z_t, t): the teacher's velocity (distillation) or the data's conditional velocity eps - x (sec. 3)."""
        if self.teacher_denoiser is None:
            return eps - x
        return -FlowView(self.teacher_denoiser).velocity(z, 1 - t, cond)

    @torch.no_grad()
    def training_velocity(self, x: Tensor, eps: Tensor, z: Tensor, t: Tensor, labels: Tensor):
        """(cond, v) for the loss; with CFG in training (sec. 4.2) labels are dropped to the null label with prob
        cfg_drop and the kept ones get v~ from the student's own u(z_t, t, t) with and without them."""
        c = self.config
        if not c.cfg_in_training:
            cond = self.cond(labels)
            return cond, self.velocity(x, eps, z, t, cond)
        keep = torch.rand(len(labels), device=labels.device) >= c.cfg_drop
        null = torch.full_like(labels, self.num_classes)
        cond = torch.where(keep, labels, null)
        v = self.velocity(x, eps, z, t, cond)
        guided = guided_velocity(v, self.average_velocity(z, t, t, labels), self.average_velocity(z, t, t, null),
                                 c.cfg_omega, c.cfg_kappa)
        return cond, torch.where(append_dims(keep, v.ndim), guided, v)

    def total_derivative(self, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond) -> Tensor:
        """du/dt along (v, 0, 1) on (z, r, t): torch.func.jvp, or central differences that move the backbone's time
        input by fd_step (one-sided at the ends of the range, and never below r)."""
        c = self.config
        step = time_input_step(lambda s: self.student.c_noise(s / (1 - s)), t, c.fd_step)
        ahead, behind = torch.minimum(step, self.t_range[1] - t), torch.minimum(step, t - r.clamp(min=self.t_range[0]))
        return directional_derivative(lambda z_, r_, t_: self.average_velocity(z_, r_, t_, cond), (z, r, t),
                                      (v, torch.zeros_like(r), torch.ones_like(t)), c.jvp, ahead, behind)

    def meanflow_objective(self, batch: Batch, step: int):
        """MeanFlow, Algorithm 1: a JVP along (v, 0, 1) on (z, r, t) gives du/dt; loss w ||u - sg(u_tgt)||^2."""
        c, x = self.config, batch.images
        r, t = sample_times(len(x), c.time_mu, c.time_sigma, c.ratio_r_neq_t, self.t_range, x.device)
        eps = torch.randn_like(x)
        tt = append_dims(t.to(x.dtype), x.ndim)
        z = (1 - tt) * x + tt * eps
        cond, v = self.training_velocity(x, eps, z, t, batch.labels)
        u = self.average_velocity(z, r, t, cond)
        du_dt = self.total_derivative(z, r, t, v, cond)
        err_sq = (u - meanflow_target(v, du_dt.to(u.dtype), r, t)).pow(2).flatten(1).sum(1)
        loss = (adaptive_weight(err_sq, c.adaptive_p, c.adaptive_c) * err_sq).mean()
        return loss, {"meanflow": loss.item(), "mse": err_sq.mean().item() / x[0].numel()}

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator, steps: int | None = None) -> Tensor:
        """MeanFlow, Algorithm 2 and sec. 4 (few steps): z_r = z_t - (t - r) u(z_t, r, t) on t = 1, (n-1)/n, ..., 0, as
        FlowEulerScheduler(interval_input=True) runs it: the model read at the student's range, h from that time."""
        n = steps or self.config.export_steps
        view, cond = FlowView(self.student), self.cond(labels)
        x = torch.randn((len(labels), *self.shape), generator=generator, device=labels.device)
        taus = [i / n for i in range(n)] + [1.0]  # dstudio's flow time, 1 - t
        for tau, tau_next in zip(taus[:-1], taus[1:]):
            read = view.clamp(torch.tensor(tau, dtype=torch.float64))
            with self.student.model.at(torch.as_tensor(tau_next, dtype=torch.float64) - read):
                x1 = view.x1_hat(x, read, cond)
            x = x + (tau_next - tau) * (x1 - x) / (1 - tau)
        return x.clamp(-1, 1)

    def export(self, path) -> None:
        sched = scheduler_from_teacher(FlowEulerScheduler, self.teacher_scheduler, interval_input=True,
                                       num_inference_steps=self.config.export_steps,
                                       prediction_type=self.student.prediction_type, sigma_max=self.student.sigma_max)
        export_image_pipeline(self.student.model.net, sched, path, method=self.name, target=self.config.target,
                              init=self.config.init)
