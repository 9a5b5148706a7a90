"""What score-distillation methods share (DMD2, SIM, MSD, teacher training): trainable teacher copies, smaller
students, training times and the one denoising score matching loss."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dstudio.distill.core.denoiser import DiscreteDenoiser, append_dims
from dstudio.distill.core.lora import adapter_view, lora_rank, plain_copy


def trainable_copy(unet: nn.Module, role: str = "student", lora=None) -> nn.Module:
    """A trainable copy of a frozen teacher backbone (fake score, or a student initialised from the teacher); with
    `lora.lora_rank` > 0 a LoRA adapter named after `role` over the teacher's own weights (distill/core/lora.py),
    except a fake score under `lora.lora_fake_score=False`."""
    if lora_rank(lora) and (role != "fake_score" or lora.lora_fake_score):
        return adapter_view(unet, role, lora)
    net = plain_copy(unet)  # without the adapters a LoRA student may already have put on `unet`
    net.requires_grad_(True)
    net.train()
    return net


def smaller_unet(teacher_unet, width: float):
    """The teacher's architecture with every channel count scaled by `width` (kept divisible by its norm groups): a
    pixel-space UNet2DModel; any other network is refused with one line."""
    from diffusers import UNet2DModel

    from dstudio.distill.core.config import ConfigError

    if type(getattr(teacher_unet, "base", teacher_unet)) is not UNet2DModel:
        raise ConfigError(f"smaller students (--student-width < 1, slimflow) scale a pixel-space UNet2DModel teacher; "
                          f"this teacher's network is a {type(getattr(teacher_unet, 'base', teacher_unet)).__name__}")

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


def sample_logit_normal_timesteps(n: int, num_train_timesteps: int, lo: float = 0.0, hi: float = 1.0,
                                  mean: float = 0.0, std: float = 1.0, device="cpu") -> Tensor:
    """Continuous t = u (T - 1), u = sigmoid(N(mean, std)) kept in [lo, hi) by resampling the normal (Esser et al.
    2024, SD3, eq. 19: the times flow-matching teachers of the SD3 / FLUX kind are trained at)."""
    u = torch.empty(0, device=device)
    while len(u) < n:
        draw = torch.sigmoid(torch.randn(2 * n, device=device, dtype=torch.float64) * std + mean)
        u = torch.cat([u, draw[(draw >= lo) & (draw < hi)]])
    return u[:n] * (num_train_timesteps - 1)


def dsm_loss(denoiser, x0: Tensor, sigma: Tensor, cond=None, noise: Tensor | None = None,
             teacher: DiscreteDenoiser | None = None) -> Tensor:
    """Vincent 2011 / EDM eq. 2: denoising score matching, ||D(x0 + sigma n) - x0||^2 under the backbone's own weighting;
    with `teacher`, teacher score matching (MSD): the target is the teacher's D at the same noisy input, under its
    weighting."""
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * noise
    target, weighting = x0, denoiser
    if teacher is not None:
        with torch.no_grad():
            target = teacher(x_t, sigma, cond)
        weighting = teacher
    x0_hat = denoiser(x_t, sigma, cond)
    w = append_dims(weighting.loss_weight(sigma).to(x0.dtype), x0.ndim)
    return (w * (x0_hat - target) ** 2).mean()
