"""What score-distillation methods share (DMD2, SIM, MSD): the fake score, its DSM loss, the GAN head, the DMD gradient."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dstudio.distill.core.denoiser import DiscreteDenoiser, append_dims
from dstudio.distill.core.lora import adapter_view, lora_rank


def trainable_copy(unet: nn.Module, role: str = "student", lora=None) -> nn.Module:
    """A trainable copy of a frozen teacher backbone (fake score, or a student initialised from the teacher); with
    `lora.lora_rank` > 0 a LoRA adapter named after `role` over the teacher's own weights (distill/core/lora.py)."""
    if lora_rank(lora):
        return adapter_view(unet, role, lora)
    net = copy.deepcopy(unet)
    net.requires_grad_(True)
    net.train()
    return net


def smaller_unet(teacher_unet, width: float):
    """The teacher's architecture with every channel count scaled by `width` (kept divisible by its norm groups)."""
    from diffusers import UNet2DModel

    cfg = dict(teacher_unet.config)
    groups = max(1, min(cfg.get("norm_num_groups", 32), round(32 * width)))
    cfg["block_out_channels"] = [max(groups, max(1, round(c * width / groups)) * groups)
                                 for c in cfg["block_out_channels"]]
    cfg["norm_num_groups"] = groups
    return UNet2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def sample_timesteps(n: int, num_train_timesteps: int, lo: float = 0.0, hi: float = 1.0, device="cpu") -> Tensor:
    """Integer t ~ U[lo T, hi T) (DMD2 uses [0.02 T, 0.98 T] for its distribution-matching loss)."""
    T = num_train_timesteps
    return torch.randint(int(lo * T), max(int(hi * T), int(lo * T) + 1), (n,), device=device)


def dsm_loss(denoiser: DiscreteDenoiser, x0: Tensor, sigma: Tensor, cond=None, noise: Tensor | None = None) -> Tensor:
    """Vincent 2011 / EDM eq. 2: denoising score matching, ||D(x0 + sigma n) - x0||^2 under the backbone's own weighting."""
    noise = torch.randn_like(x0) if noise is None else noise
    x0_hat = denoiser(x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * noise, sigma, cond)
    w = append_dims(denoiser.loss_weight(sigma).to(x0.dtype), x0.ndim)
    return (w * (x0_hat - x0) ** 2).mean()


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Yin et al. 2024 (DMD2), eq. 2 as in the reference code: (p_real - p_fake) / mean_CHW |p_real|, p = x - D(x_t)."""
    p_real, p_fake = x - x0_real, x - x0_fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num(grad)


def dmd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """The stop-gradient surrogate whose gradient in x is `grad` / numel: 0.5 ||x - sg(x - grad)||^2."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


class BottleneckFeatures:
    """Captures a UNet's mid-block output on every forward (the fake score's bottleneck, for the GAN head)."""

    def __init__(self, unet: nn.Module):
        self.value: Tensor | None = None
        unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output[0] if isinstance(output, tuple) else output


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
