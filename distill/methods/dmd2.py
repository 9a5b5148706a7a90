"""DMD2 (Yin et al. 2024): distribution matching with a trainable fake score, TTUR and a GAN head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import StartOptions, append_dims, start_noise
from dstudio.distill.core.lora import LoraOptions
from dstudio.distill.core.method import Batch, Distiller, Phase, register
from dstudio.distill.core.score import dsm_loss, sample_logit_normal_timesteps, sample_timesteps, trainable_copy
from dstudio.samplers import StudentScheduler, append_zero, discrete_timesteps, sample_multistep, scheduler_from_teacher


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Yin et al. 2024 (DMD2), eq. 2 as in the reference code: (p_real - p_fake) / mean_CHW |p_real|, p = x - D(x_t)."""
    p_real, p_fake = x - x0_real, x - x0_fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num(grad)


def dmd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """The stop-gradient surrogate whose gradient in x is `grad` / numel: 0.5 ||x - sg(x - grad)||^2."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def bottleneck(denoiser: nn.Module, x_t: Tensor, sigma: Tensor, cond, tap) -> Tensor:
    """The bottleneck features of a denoiser's backbone at (x_t, sigma), read where the teacher's `tap` says (a UNet's
    mid-block, a transformer's middle block): DMD2's GAN head input."""
    with tap.capture(denoiser.model) as outputs:
        denoiser(x_t, sigma, cond)
    return outputs[-1]


class DiscriminatorHead(nn.Module):
    """DMD2's GAN classifier: a small conv stack on the fake score's bottleneck features -> one logit per image."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        groups = min(32, width) if width % min(32, width) == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).squeeze(1)


@dataclass
class DMD2Config(LoraOptions, StartOptions):
    data: str = "mnist"                  # real images for the GAN loss
    num_steps: int = 1                   # 1: one-step; more: few-step student trained with backward simulation
    guidance: float = 1.0                # classifier-free guidance on the real score only
    critic_ratio: int = 5                # fake-score/critic updates per generator update (TTUR)
    lr_generator: float = 2e-6
    lr_critic: float = 2e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 10.0
    gan: bool = True
    lambda_gan_critic: float = 1e-2      # lambda_D
    lambda_gan_generator: float = 3e-3   # lambda_G
    t_min: float = 0.02                  # the DMD loss's noise levels: t ~ U[t_min T, t_max T]
    t_max: float = 0.98                  # (the GAN head's are t ~ U[0, T), drawn for each of its inputs)
    # how the DMD loss draws t in [t_min, t_max]: uniformly (DMD2), logit-normally (SD3's training times), or "auto":
    # logit-normal for flow-matching teachers. Uniform is the default: on the plain-diffusers flow teacher of
    # benchmarks/teachers.py, dmd2 quick gave 1.79x / 1.97x the teacher (FID-mnist / pixels) uniform, 3.2x / 2.2x auto
    t_dist: Literal["auto", "uniform", "logit_normal"] = "uniform"
    head_width: int = 64

    def validate(self) -> None:
        require(self.num_steps >= 1, f"method.num_steps={self.num_steps} must be >= 1")
        require(self.critic_ratio >= 1, f"method.critic_ratio={self.critic_ratio} must be >= 1")
        require(self.lr_generator > 0 and self.lr_critic > 0,
                f"method.lr_generator={self.lr_generator} and method.lr_critic={self.lr_critic} must be > 0")
        require(0 <= self.t_min < self.t_max <= 1, f"method.t_min={self.t_min}, t_max={self.t_max} must satisfy "
                                                   f"0 <= t_min < t_max <= 1")
        require(self.guidance >= 0, f"method.guidance={self.guidance} must be >= 0")


@register("dmd2")
class DMD2(Distiller):
    """Yin et al. 2024 (DMD2), Alg. 1: G <- DMD gradient + lambda_G GAN; fake score <- DSM + lambda_D GAN, R:1."""

    Config = DMD2Config

    def __init__(self, config: DMD2Config, teacher=None, data=None):
        super().__init__(config, teacher, data)
        require(not config.gan or data is not None, "dmd2 with the GAN loss needs real data (method.gan=false: none)")
        self.start_t = teacher.denoiser.start_t(self.start_gain)
        flow = teacher.denoiser.prediction_type == "flow"
        self.t_dist = ("logit_normal" if flow else "uniform") if config.t_dist == "auto" else config.t_dist
        require(config.num_steps <= self.start_t + 1, f"method.num_steps={config.num_steps} exceeds the "
                                                      f"{self.start_t + 1} steps a student of this teacher can take")
        self.T, self.schedule = teacher.num_train_timesteps, teacher.denoiser.schedule
        self.real_score = teacher.guided(config.guidance)
        self.student = self.build_student(teacher)
        self.fake_score = teacher.denoiser.like(trainable_copy(teacher.unet, "fake_score", config))
        self.tap = teacher.feature_tap
        self.head = DiscriminatorHead(self.tap.channels, config.head_width)
        self.timesteps = discrete_timesteps(self.start_t + 1, config.num_steps, "trailing")
        self.register_buffer("student_sigmas", append_zero(teacher.denoiser.t_to_sigma(
            torch.tensor(self.timesteps))).float(), persistent=False)

    def build_student(self, teacher) -> nn.Module:
        """The one-step (or few-step) student: a trainable copy of the teacher in the students' parameterisation."""
        return self.student_of(trainable_copy(teacher.unet, "student", self.config))

    def phases(self) -> list[Phase]:
        return self.dmd_phases()

    def activation_passes(self):
        """The generator's student and (GAN) the frozen fake score to the features its head reads; the critic's
        score matching and the GAN head's passes on fake and real images."""
        gan = [("fake_score", "tap", "head")] if self.config.gan else []
        return {"generator": [("student", "full"), *gan], "critic": [("fake_score", "full"), *gan, *gan]}

    def dmd_phases(self, start: int = 0, batches=None) -> list[Phase]:
        """From step `start`: the generator every `critic_ratio` steps, the fake score and GAN head every step (on
        `batches`, a phase batch source, when given)."""
        c = self.config
        common = dict(betas=c.betas, weight_decay=c.weight_decay, grad_clip=c.grad_clip, start=start, batches=batches)
        return [Phase("generator", ("student",), loss=self.generator_loss, lr=c.lr_generator, every=c.critic_ratio,
                      **common),
                Phase("critic", ("fake_score", "head"), loss=self.critic_loss, lr=c.lr_critic, **common)]

    # --- the generator --------------------------------------------------------------------------
    def _noise(self, n: int, generator=None) -> Tensor:
        """Unit noise at the first student step (the teacher's terminal one), as the exported pipeline draws it."""
        return start_noise(self.fake_score, (n, *self.shape), self.student_sigmas[0], generator,
                           self.student_sigmas.device)  # the fake score keeps the students' state convention

    def generate(self, labels: Tensor) -> Tensor:
        return self.generate_with(self.student, self.cond(labels), len(labels))

    def generate_with(self, student, cond, n: int) -> Tensor:
        """x0 from a student; few-step students start from a backward-simulated state (DMD2 Sec. 4.5)."""
        s = self.student_sigmas
        k = int(torch.randint(0, self.config.num_steps, ()))
        x = self._noise(n)
        if k:  # k student steps without gradient: denoise, re-noise, ... ending at sigma_k
            with torch.no_grad():
                x = sample_multistep(student, x, s[:k + 1], cond)
        return student(x, s[k], cond)

    def _gan_logits(self, x0: Tensor, cond) -> Tensor:
        """The GAN head on x0 noised at its own t ~ U[0, T) (DMD2's compute_cls_logits, one draw per call)."""
        sigma = self.schedule.t_to_sigma(sample_timesteps(len(x0), self.T, device=x0.device)).to(x0.device)
        return self.critic_logits(x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * torch.randn_like(x0), sigma, cond)

    def critic_logits(self, x_t: Tensor, sigma: Tensor, cond) -> Tensor:
        """One logit per image from the fake score's bottleneck features at (x_t, sigma)."""
        return self.head(bottleneck(self.fake_score, x_t, sigma, cond, self.tap))

    def gan_active(self, step: int) -> bool:
        return self.config.gan

    def generator_loss(self, batch: Batch, step: int):
        """DMD2, Alg. 1, generator: the distribution-matching gradient (eq. 2) + lambda_G non-saturating GAN."""
        labels = batch.labels
        cond = self.cond(labels)
        x = self.generate(labels)
        sigma = self.real_score_sigma(len(x), x.device)
        x_t = (x + append_dims(sigma.to(x.dtype), x.ndim) * torch.randn_like(x)).detach()
        with torch.no_grad():
            grad = dmd_gradient(x.detach(), self.real_score(x_t, sigma, cond), self.fake_score(x_t, sigma, cond))
        loss_dm = dmd_loss(x, grad)
        logs = {"dm": loss_dm.item()}
        loss = loss_dm
        if self.gan_active(step):
            loss_gan = F.softplus(-self._gan_logits(x, cond)).mean()
            loss = loss + self.config.lambda_gan_generator * loss_gan
            logs["gan_g"] = loss_gan.item()
        return loss, logs

    def critic_loss(self, batch: Batch, step: int):
        """DMD2, Alg. 1, critic: the fake score by denoising score matching on generator samples + lambda_D GAN."""
        real, labels = batch.images, batch.labels
        cond = self.cond(labels)
        with torch.no_grad():
            x = self.generate(labels)
        t = sample_timesteps(len(x), self.T, device=x.device)
        loss_fake = dsm_loss(self.fake_score, x, self.schedule.t_to_sigma(t).to(x.device), cond)
        logs = {"dsm": loss_fake.item()}
        loss = loss_fake
        if self.gan_active(step):
            logit_fake, logit_real = self._gan_logits(x, cond), self._gan_logits(real, cond)
            loss_disc = (F.softplus(logit_fake) + F.softplus(-logit_real)).mean()
            loss = loss + self.config.lambda_gan_critic * loss_disc
            logs["gan_d"] = loss_disc.item()
        return loss, logs

    def real_score_sigma(self, n: int, device) -> Tensor:
        """t ~ U[t_min T, t_max T), never noisier than the student's first step (an eps teacher's x0 gain caps it)."""
        c = self.config
        t_max = min(c.t_max, (self.start_t + 1) / self.T)
        if self.t_dist == "logit_normal":
            t = sample_logit_normal_timesteps(n, self.T, c.t_min, t_max, device=device)
        else:
            t = sample_timesteps(n, self.T, c.t_min, t_max, device)
        return self.schedule.t_to_sigma(t).to(device)

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        x = self._noise(len(labels), generator)
        x0 = sample_multistep(self.student, x, self.student_sigmas, self.cond(labels), generator=generator)
        return self._teacher.decode(x0).clamp(-1, 1)

    def exported_unet(self):
        return self.student.model

    def export(self, path) -> None:
        sched = scheduler_from_teacher(StudentScheduler, self.teacher_scheduler, timesteps=self.timesteps,
                                       prediction_type=self._teacher.denoiser.prediction_type)
        info = dict(method=self.name, teacher=self._teacher.source, num_steps=self.config.num_steps,
                    guidance=self.config.guidance)
        self._teacher.export(self.exported_unet(), sched, path, **info)
