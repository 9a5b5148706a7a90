"""SIM (Luo et al. 2024): data-free score implicit matching; its L2 instance SiD (Zhou et al. 2024) by default, the
pseudo-Huber surrogate as `loss=sim`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import StartOptions, append_dims, start_noise
from dstudio.distill.core.losses import ict_huber_c
from dstudio.distill.core.lora import LoraOptions
from dstudio.distill.core.method import Batch, Distiller, Phase, PromptOptions, register
from dstudio.distill.core.score import dsm_loss, trainable_copy
from dstudio.samplers import StudentScheduler, scheduler_from_teacher


def sid_generator_sigmas(n: int, t_max: float, sigma_min: float = 0.002, sigma_max: float = 80.0,
                         rho: float = 7.0, device="cpu") -> Tensor:
    """Zhou et al. 2024 (SiD), generator noise levels: sigma = ramp(1 - t), t ~ U[0, t_max), on EDM's eq. 5 ramp
    (sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho; t_max < 1 leaves out the highest levels."""
    r = 1 - torch.rand(n, device=device, dtype=torch.float64) * t_max
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + r * (lo - hi)) ** rho


def sim_generator_loss(x_g: Tensor, y_real: Tensor, y_fake: Tensor, c: float | Tensor) -> Tensor:
    """Luo et al. 2024 (SIM), Alg. 1 with the pseudo-Huber distance d(y) = sqrt(|y|^2 + c^2) - c:
    L = sg[(y_r - y_f) / sqrt(|y_r - y_f|^2 + c^2)] . (y_r - x_g) / sg(mean |x_g - y_r|), per image; `c` a number or
    one per image (see huber_constant)."""
    dims = tuple(range(1, x_g.ndim))
    diff = y_real - y_fake
    c = append_dims(torch.as_tensor(c, dtype=x_g.dtype, device=x_g.device), x_g.ndim)
    u = (diff / (diff.pow(2).sum(dims, keepdim=True) + c**2).sqrt()).detach()
    w = (x_g - y_real).abs().mean(dims, keepdim=True).detach().clamp(min=1e-8)
    return ((u * (y_real - x_g)) / w).sum(dims).mean()


def huber_constant(c: float, sigma: Tensor, space: str) -> Tensor | float:
    """SIM's pseudo-Huber acts on the score difference (s_r - s_f) = (y_r - y_f) / sigma^2 (Luo et al. 2024, sec. 3.3):
    the same distance on the x0 difference has the constant c sigma^2 ("score"); "x0" keeps c at every level."""
    return c * sigma.pow(2) if space == "score" else c


def sid_generator_loss(x_g: Tensor, y_real: Tensor, y_fake: Tensor, alpha: float = 1.2) -> Tensor:
    """Zhou et al. 2024 (SiD), eq. 18: (y_r - y_f) . [(y_r - x_g) - alpha (y_r - y_f)] / sg(mean |x_g - y_r|)."""
    dims = tuple(range(1, x_g.ndim))
    w = (x_g - y_real).abs().mean(dims, keepdim=True).detach().clamp(min=1e-8)
    diff = y_real - y_fake
    return ((diff * ((y_real - x_g) - alpha * diff)) / w).sum(dims).mean()


@dataclass
class SIMConfig(LoraOptions, StartOptions, PromptOptions):
    # SiD: on zoo teachers the pseudo-Huber surrogate collapsed each class onto one image (eps / cosine: 104x the
    # teacher's FID against SiD's 5.0x) and unconditional teachers onto one digit (360x against 71x)
    loss: Literal["sim", "sid"] = "sid"
    huber_c: float | None = None      # None: 0.00054 * sqrt(C*H*W), iCT's constant (Song & Dhariwal 2023)
    huber_space: Literal["score", "x0"] = "score"  # the distance on the score difference (the paper) or the x0 one
    sid_alpha: float = 1.2
    sigma_init: float = 2.5           # the generator maps sigma_init * z to an image in one step
    guidance: float = 1.0             # CFG on the teacher score
    lr_generator: float = 1e-5
    lr_fake: float = 1e-5
    betas: tuple[float, float] = (0.0, 0.999)
    grad_clip: float = 10.0
    p_mean: float = -1.2              # fake-score noise levels: sigma ~ lognormal(p_mean, p_std)
    p_std: float = 1.2
    t_max: float = 0.8                # generator noise levels: sigma = ramp(1 - U[0, t_max)) (SiD's tmax/1000)

    def validate(self) -> None:
        require(self.lr_generator > 0 and self.lr_fake > 0, f"method.lr_generator={self.lr_generator} and "
                                                            f"method.lr_fake={self.lr_fake} must be > 0")
        require(self.sigma_init > 0, f"method.sigma_init={self.sigma_init} must be > 0")
        require(0 < self.t_max <= 1, f"method.t_max={self.t_max} must be in (0, 1]")
        require(self.huber_c is None or self.huber_c > 0, f"method.huber_c={self.huber_c} must be > 0")


@register("sim")
class SIM(Distiller):
    """Luo et al. 2024 (SIM), Alg. 1: fake score by DSM on generator samples, generator through both scores, 1:1."""

    Config = SIMConfig
    needs_data = False

    def __init__(self, config: SIMConfig, teacher=None, data=None):
        super().__init__(config, teacher, data)
        self.real_score = teacher.guided(config.guidance)
        self.student = self.student_of(trainable_copy(teacher.unet, "student", config))
        self.fake_score = teacher.denoiser.like(trainable_copy(teacher.unet, "fake_score", config))
        lo, hi = teacher.denoiser.sigma_min, teacher.denoiser.sigma_max
        self.sigma_range = (lo, hi)
        self.generator_range = (max(lo, 2e-3), min(self.student.sigma_max, 80.0))  # SiD's EDM range, inside the student's
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # follows the method's device
        self.c = config.huber_c or ict_huber_c(self.shape)
        # The exported pipeline starts from unit noise at an integer step: train exactly that input,
        # unit noise at sigma_g = sigma(t_g), t_g the step nearest to sigma_init.
        self.student_t = min(int(round(float(teacher.denoiser.sigma_to_t(torch.tensor(config.sigma_init))))),
                             teacher.denoiser.start_t(self.start_gain))
        self.sigma_g = float(teacher.denoiser.t_to_sigma(torch.tensor(self.student_t)))

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("fake", ("fake_score",), loss=self.fake_loss, lr=c.lr_fake, betas=c.betas, grad_clip=c.grad_clip),
                Phase("generator", ("student",), loss=self.generator_loss, lr=c.lr_generator, betas=c.betas,
                      grad_clip=c.grad_clip)]

    def activation_passes(self):
        """The generator differentiates through the teacher (and, for SiD, the fake score) at its own samples."""
        scores = [("real_score", "full")] + ([("fake_score", "full")] if self.config.loss == "sid" else [])
        return {"fake": [("fake_score", "full")], "generator": [("student", "full"), *scores]}

    def _labels(self, n: int, device):
        return self.random_cond(n, device)

    def generate(self, labels, n: int, generator=None) -> Tensor:
        device = self.anchor.device
        x = start_noise(self.student, (n, *self.shape), self.sigma_g, generator, device)
        return self.student(x, torch.tensor(self.sigma_g, device=device), labels)

    def fake_loss(self, batch: Batch, step: int):
        """Luo et al. 2024 (SIM), Alg. 1: the fake score by denoising score matching on generator samples."""
        n, device = batch.size, self.anchor.device
        labels = self._labels(n, device)
        with torch.no_grad():
            x_g = self.generate(labels, n)
        sigma = (torch.randn(n, device=device) * self.config.p_std + self.config.p_mean).exp()
        loss = dsm_loss(self.fake_score, x_g, sigma.clamp(*self.sigma_range).double(), labels)
        return loss, {"dsm": loss.item()}

    def generator_loss(self, batch: Batch, step: int):
        """Luo et al. 2024 (SIM), Alg. 1 (or SiD, Zhou et al. 2024, eq. 18): the generator through both scores."""
        n, device = batch.size, self.anchor.device
        labels = self._labels(n, device)
        x_g = self.generate(labels, n)
        sigma = sid_generator_sigmas(n, self.config.t_max, *self.generator_range, device=device)
        x_t = x_g + append_dims(sigma.to(x_g.dtype), x_g.ndim) * torch.randn_like(x_g)
        y_real = self.real_score(x_t, sigma, labels)
        if self.config.loss == "sid":
            loss = sid_generator_loss(x_g, y_real, self.fake_score(x_t, sigma, labels), self.config.sid_alpha)
        else:  # SIM differentiates through y_real only: y_fake enters under sg[.], so it needs no graph
            with torch.no_grad():
                y_fake = self.fake_score(x_t, sigma, labels)
            loss = sim_generator_loss(x_g, y_real, y_fake, huber_constant(self.c, sigma, self.config.huber_space))
        return loss, {self.config.loss: loss.item()}

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        return self._teacher.decode(self.generate(self.cond(labels), len(labels), generator)).clamp(-1, 1)

    def export(self, path) -> None:
        # one step from pure noise at the time step whose sigma is sigma_init
        sched = scheduler_from_teacher(StudentScheduler, self.teacher_scheduler, timesteps=[self.student_t],
                                       prediction_type=self.student.prediction_type)
        self._teacher.export(self.student.model, sched, path, method=self.name, loss=self.config.loss,
                              sigma_init=self.config.sigma_init)
