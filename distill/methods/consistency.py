"""Improved consistency training (Song & Dhariwal 2023, iCT), and consistency distillation as its `target=teacher`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import ConsistencyDenoiser, StartOptions, append_dims, start_noise
from dstudio.distill.core.losses import ict_huber_c, pseudo_huber
from dstudio.distill.core.lora import LoraOptions
from dstudio.distill.core.method import Batch, Distiller, Phase, register
from dstudio.distill.core.score import trainable_copy
from dstudio.samplers import StudentScheduler, karras_sigmas, sample_multistep, scheduler_from_teacher


def discretisation_steps(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT, sec. 3.4: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def index_probabilities(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT, sec. 3.5: P(i) ∝ erf((ln s_{i+1} - Pm) / (sqrt2 Ps)) - erf((ln s_i - Pm) / (sqrt2 Ps)), i = 1..N-1."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def with_dropout(net, p: float, fresh: bool):
    """The backbone rebuilt with dropout p in its blocks: freshly initialised, or keeping `net`'s weights."""
    if not fresh and p == 0:
        return net
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    out = type(net).from_config({**config, "dropout": p})
    if not fresh:
        out.load_state_dict(net.state_dict())
    return out.train()


@dataclass
class ConsistencyConfig(LoraOptions, StartOptions):
    data: str = "mnist"
    target: Literal["self", "teacher"] = field(default="self", metadata={  # iCT's self-target, or a teacher ODE step
        "cli": "--target", "help": "'self' (training, iCT) or 'teacher' (distillation)"})
    init: Literal["scratch", "teacher"] | None = field(default=None, metadata={  # "teacher": easy consistency tuning
        "cli": "--init", "help": "start from the 'teacher' or 'scratch' (default: the teacher with --target teacher)"})
    solver: Literal["heun", "euler"] = "heun"  # consistency distillation's teacher ODE step (CM paper: Heun)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5          # iCT's boundary scalings, from scratch (from the teacher f is its own denoiser)
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float | None = None     # None: 0.00054 sqrt(C*H*W)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    mid_sigma: float = 0.821         # iCT's two-step sampler: re-noise to this sigma (CIFAR-10 value)
    dropout: float | None = None     # None: 0.3 from scratch (iCT's CIFAR-10 value), 0 from the teacher's weights

    def __post_init__(self) -> None:
        if self.init is None:  # distillation starts from the teacher (3x better at quick); iCT from scratch
            self.init = "teacher" if self.target == "teacher" else "scratch"

    def validate(self) -> None:
        require(0 < self.sigma_min < self.sigma_max, f"method.sigma_min={self.sigma_min} and method.sigma_max="
                                                     f"{self.sigma_max} must satisfy 0 < sigma_min < sigma_max")
        require(1 <= self.s0 <= self.s1, f"method.s0={self.s0} and method.s1={self.s1} must satisfy 1 <= s0 <= s1")
        require(self.lr > 0, f"method.lr={self.lr} must be > 0")
        require(self.p_std > 0, f"method.p_std={self.p_std} must be > 0")
        require(self.sigma_data > 0, f"method.sigma_data={self.sigma_data} must be > 0")
        require(self.dropout is None or 0 <= self.dropout < 1, f"method.dropout={self.dropout} must be in [0, 1)")
        require(self.sigma_min < self.mid_sigma < self.sigma_max,
                f"method.mid_sigma={self.mid_sigma} must lie between sigma_min and sigma_max")


@register("consistency", "ict")
class Consistency(Distiller):
    """iCT: f(x + s_{i+1} eps, s_{i+1}) -> sg f(x + s_i eps, s_i), weighted 1 / (s_{i+1} - s_i), pseudo-Huber."""

    Config = ConsistencyConfig

    def __init__(self, config: ConsistencyConfig, teacher=None, data=None):
        super().__init__(config, teacher, data)  # the teacher gives the architecture and the time steps
        require(not config.lora_rank or (config.init == "teacher" and self.dropout_rate(config) == 0),
                "method.lora_rank > 0 adapts the teacher's own weights: it needs --init teacher and method.dropout=0")
        net = with_dropout(trainable_copy(teacher.unet, "student", config), self.dropout_rate(config),
                           config.init == "scratch")
        if config.init == "teacher":  # f is the teacher's own denoiser (f(x, sigma_min) = x up to sigma_min eps), as ECT
            self.student = self.student_of(net)
            lo, hi = self.student.sigma_min, self.student.sigma_max
        else:  # iCT's boundary-respecting scalings over a fresh backbone
            self.student = ConsistencyDenoiser(net, teacher.denoiser.schedule, config.sigma_data, config.sigma_min,
                                               config.sigma_max)
            lo, hi = 0.0, float("inf")
        self.sigma_range = (max(config.sigma_min, lo), min(config.sigma_max, hi))
        self.teacher_denoiser = teacher.for_sampling() if config.target == "teacher" else None
        self.c = config.huber_c or ict_huber_c(self.shape)

    @staticmethod
    def dropout_rate(config: ConsistencyConfig) -> float:
        if config.dropout is not None:
            return config.dropout
        return 0.3 if config.init == "scratch" else 0.0

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("consistency", ("student",), loss=self.consistency_loss, lr=c.lr, betas=c.betas,
                      grad_clip=c.grad_clip)]

    def sigmas(self, step: int) -> Tensor:
        """The Karras grid (rho = 7) of N(k) points, ascending; K of the curriculum is the run's step budget."""
        c = self.config
        if self.context is None:
            raise RuntimeError("the iCT curriculum needs the run's step budget: bind(RunContext(...)) first")
        n = discretisation_steps(step, self.context.steps, c.s0, c.s1)
        return karras_sigmas(n, *self.sigma_range, c.rho).flip(0)

    def target_point(self, x_next: Tensor, sigma_next: Tensor, sigma: Tensor, x0: Tensor, noise: Tensor, cond):
        """CT: x + s_i eps with the same eps (iCT); CD: one Heun (or Euler) step of the teacher's probability-flow ODE
        dx/dsigma = (x - D(x, sigma)) / sigma from s_{i+1} to s_i (Song et al. 2023, sec. 4; EDM Alg. 1)."""
        if self.teacher_denoiser is None:
            return x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * noise
        dims = lambda s: append_dims(s.to(x_next.dtype), x_next.ndim)  # noqa: E731
        slope = lambda x, s: (x - self.teacher_denoiser(x, s, cond)) / dims(s)  # noqa: E731
        d = slope(x_next, sigma_next)
        x_euler = x_next + dims(sigma - sigma_next) * d
        if self.config.solver == "euler":
            return x_euler
        return x_next + dims(sigma - sigma_next) * (d + slope(x_euler, sigma)) / 2

    def consistency_loss(self, batch: Batch, step: int):
        """iCT, eq. 9: lambda(s_i) d(f(x + s_{i+1} eps, s_{i+1}), sg f(x + s_i eps, s_i)), lambda = 1 / (s_{i+1} - s_i)."""
        x0, cond = batch.images, self.cond(batch.labels)
        grid = self.sigmas(step).to(x0.device)
        i = torch.multinomial(index_probabilities(grid, self.config.p_mean, self.config.p_std), len(x0),
                              replacement=True).to(x0.device)
        sigma, sigma_next = grid[i], grid[i + 1]
        noise = torch.randn_like(x0)
        x_next = x0 + append_dims(sigma_next.to(x0.dtype), x0.ndim) * noise
        # iCT, sec. 3.1: both branches draw the same dropout masks (the RNG is rewound after the target's forward)
        with torch.no_grad(), torch.random.fork_rng(devices=[x0.device] if x0.device.type == "cuda" else []):
            target = self.student(self.target_point(x_next, sigma_next, sigma, x0, noise, cond), sigma, cond)
        pred = self.student(x_next, sigma_next, cond)
        weight = (1 / (sigma_next - sigma)).to(x0.dtype)
        loss = (weight * pseudo_huber(pred, target, self.c)).mean()
        return loss, {"ict" if self.teacher_denoiser is None else "cd": loss.item(), "N": float(len(grid))}

    def export_timesteps(self, steps: int) -> list[int]:
        c = self.config
        wanted = [self.sigma_range[1], c.mid_sigma][:steps]
        ts = self.student.schedule.sigma_to_t(torch.tensor(wanted, dtype=torch.float64)).round().long().tolist()
        return sorted(set(ts), reverse=True)

    def sample(self, labels: Tensor, generator: torch.Generator, steps: int = 1) -> Tensor:
        """Song et al. 2023, Algorithm 1 at the exported (integer) steps: one step, or two with re-noising."""
        sched = self.student.schedule
        sigmas = torch.cat([sched.t_to_sigma(torch.tensor(self.export_timesteps(steps))), torch.zeros(1)])
        x = start_noise(self.student, (len(labels), *self.shape), sigmas[0], generator, labels.device)
        x0 = sample_multistep(self.student, x, sigmas.to(x.device), self.cond(labels), generator)
        return self._teacher.decode(x0).clamp(-1, 1)

    def export(self, path) -> None:
        own = {"prediction_type": self.student.prediction_type} if self.config.init == "teacher" else {
            "prediction_type": "consistency", "sigma_data": self.config.sigma_data, "sigma_min": self.config.sigma_min}
        sched = scheduler_from_teacher(StudentScheduler, self.teacher_scheduler, timesteps=self.export_timesteps(2),
                                       num_inference_steps=1, **own)
        self._teacher.export(self.student.model, sched, path, method=self.name, target=self.config.target,
                              init=self.config.init)
