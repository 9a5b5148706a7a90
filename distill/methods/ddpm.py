"""Training a teacher from data: DDPM (the embedded teacher's objective) or flow matching, the zoo's options."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import ClippedDenoiser, DiscreteDenoiser, FlowMatchDenoiser, start_noise
from dstudio.distill.core.export import export_image_pipeline, provenance
from dstudio.distill.core.io import atomic_path, save_json
from dstudio.distill.core.method import Batch, Method, Phase, register
from dstudio.distill.core.pipeline_dstudio import class_embeddings
from dstudio.distill.core.score import dsm_loss
from dstudio.samplers import append_zero, discrete_timesteps, sample_ddim

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class DDPMConfig:
    data: str = "mnist"
    resolution: int = 16
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # Cosine betas capped at 0.999 end at alphabar ~ 2e-9 (sigma ~ 2e4): an eps-model's x0 = x - sigma eps
    # multiplies its error by 2e4 at the first step, while v-prediction stays well conditioned at every sigma.
    prediction_type: str = "v_prediction"
    objective: Literal["ddpm", "flow_matching"] = "ddpm"  # flow_matching: x_s = (1 - s) x0 + s eps, target eps - x0
    beta_start: float = 0.0001
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024: rescale the betas so that the last step has SNR 0
    clip_sample: bool = False             # written to the scheduler: diffusers then clips x0 to [-1, 1] when sampling
    flow_shift: float = 1.0               # FlowMatchEulerDiscreteScheduler's shift (SD3 uses 3.0)
    conditional: bool = True              # false: an unconditional teacher (labels ignored)
    layout: Literal["dstudio", "diffusers"] = "dstudio"  # diffusers: a DDPMPipeline folder (model_index + unet + scheduler)
    label_dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grid_steps: int = 50

    def validate(self) -> None:
        require(self.resolution >= 4, f"method.resolution={self.resolution} must be >= 4")
        require(self.resolution % 2 ** (len(self.channels) - 1) == 0,
                f"method.resolution={self.resolution} must be divisible by 2^(levels-1)={2 ** (len(self.channels) - 1)}")
        require(all(c > 0 for c in self.channels), f"method.channels={self.channels} must be positive")
        require(0 <= self.label_dropout < 1, f"method.label_dropout={self.label_dropout} must be in [0, 1)")
        require(self.lr > 0, f"method.lr={self.lr} must be > 0")
        require(self.prediction_type in ("epsilon", "v_prediction", "sample"),
                f"method.prediction_type={self.prediction_type!r} is not one of epsilon, v_prediction, sample")
        require(self.beta_schedule in BETA_SCHEDULES,
                f"method.beta_schedule={self.beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
        require(self.objective in ("ddpm", "flow_matching"),
                f"method.objective={self.objective!r} is not one of ddpm, flow_matching")
        require(self.layout in ("dstudio", "diffusers"), f"method.layout={self.layout!r} is not one of dstudio, diffusers")
        require(self.flow_shift > 0, f"method.flow_shift={self.flow_shift} must be > 0")


def build_unet(cfg: DDPMConfig, in_channels: int, num_classes: int):
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if cfg.attention and i > 0 else "DownBlock2D" for i in range(len(cfg.channels)))
    up = tuple("AttnUpBlock2D" if cfg.attention and i < len(cfg.channels) - 1 else "UpBlock2D"
               for i in range(len(cfg.channels)))
    return UNet2DModel(
        sample_size=cfg.resolution, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up,
        norm_num_groups=min(32, math.gcd(*cfg.channels)),
        num_class_embeds=class_embeddings(num_classes),  # + the null label for CFG
    )


def build_scheduler(cfg: DDPMConfig):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.objective == "flow_matching":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.flow_shift)
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
                         clip_sample=cfg.clip_sample, rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
                         timestep_spacing="trailing")


def build_denoiser(cfg: DDPMConfig, unet, scheduler) -> DiscreteDenoiser:
    if cfg.objective == "flow_matching":
        return FlowMatchDenoiser(unet, cfg.num_train_timesteps, cfg.flow_shift)
    return DiscreteDenoiser(unet, scheduler.alphas_cumprod, cfg.prediction_type)


@register("ddpm")
class DDPM(Method):
    """Ho et al. 2020, eq. 14 (L_simple) as ||D(x0 + sigma eps) - x0||^2 / c_out^2 (with a flow-matching denoiser:
    Lipman et al. 2023, ||u(x_s, s) - (eps - x0)||^2), with label dropout."""

    Config = DDPMConfig
    needs_teacher = False
    is_distiller = False
    student_module = "unet"

    def __init__(self, config: DDPMConfig, teacher=None, data=None):
        super().__init__(config)
        require(data is not None, "ddpm training needs a data set")
        self.num_classes = data.num_classes if config.conditional else 0
        self.in_channels = data.images.shape[1]
        self.unet = build_unet(config, self.in_channels, self.num_classes)
        self.scheduler = build_scheduler(config)
        self.denoiser = build_denoiser(config, self.unet, self.scheduler)

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("denoise", ("unet",), loss=self.denoise_loss, lr=c.lr, weight_decay=c.weight_decay,
                      grad_clip=c.grad_clip)]

    def denoise_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Ho et al. 2020, eq. 14 (L_simple) on x0 (or flow matching's velocity loss), labels dropped for CFG."""
        x0, labels = batch.images, batch.labels
        if self.num_classes:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)  # the null label
        else:
            labels = None
        t = torch.randint(0, self.config.num_train_timesteps, (len(x0),), device=x0.device)
        loss = dsm_loss(self.denoiser, x0, self.denoiser.t_to_sigma(t).to(x0.device), labels)
        return loss, {"loss": loss.item()}

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        steps = discrete_timesteps(self.config.num_train_timesteps, self.config.grid_steps)
        sigmas = append_zero(self.denoiser.t_to_sigma(torch.tensor(steps)).to(labels.device))
        shape = (len(labels), self.in_channels, self.config.resolution, self.config.resolution)
        x = start_noise(self.denoiser, shape, sigmas[0], generator, labels.device)
        denoiser = ClippedDenoiser(self.denoiser, clip_range=1.0) if self.config.clip_sample else self.denoiser
        return sample_ddim(denoiser, x, sigmas.float(), labels if self.num_classes else None).clamp(-1, 1)

    def export(self, path) -> None:
        if self.config.layout == "dstudio":
            export_image_pipeline(self.unet, self.scheduler, path, method=self.name, num_classes=self.num_classes)
            return
        from diffusers import DDPMPipeline

        with atomic_path(path, is_dir=True) as tmp:  # the folder diffusers' own DDPMPipeline writes
            DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(tmp, safe_serialization=True)
            save_json(provenance(method=self.name, num_classes=self.num_classes), tmp / "dstudio.json")
