"""Robust and perceptual distances shared by the flow and consistency methods."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import Tensor


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Song & Dhariwal 2023 (iCT), sec. 3.3: d(x, y) = sqrt(||x - y||^2 + c^2) - c on each sample's L2 norm."""
    sq = (x - y).pow(2).flatten(1).sum(1)
    return (sq + c**2).sqrt() - c


def ict_huber_c(shape) -> float:
    """iCT's constant c = 0.00054 sqrt(d), d = C*H*W (0.03 on CIFAR-10)."""
    return 0.00054 * math.sqrt(math.prod(shape))


def rfpp_huber_c(shape) -> float:
    """RF++'s constant c = 0.00054 d (Lee et al. 2024, sec. 4.3 and their train.py); the loss is then divided by d."""
    return 0.00054 * math.prod(shape)


def rfpp_premetric(v_hat: Tensor, v: Tensor) -> Tensor:
    """Lee et al. 2024 (RF++), sec. 4.3: (sqrt(||v_hat - v||^2 + c^2) - c) / d with c = 0.00054 d, per sample."""
    d = math.prod(v.shape[1:])
    return pseudo_huber(v_hat, v, rfpp_huber_c(v.shape[1:])) / d


def load_lpips(device, quiet: bool = False) -> "torch.nn.Module | None":
    """LPIPS (VGG) when the `lpips` package and its weights can be loaded, else None (with one warning unless
    `quiet`)."""
    try:
        import lpips  # optional: not a dependency of dstudio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
        net.requires_grad_(False)
        return net
    except Exception as e:  # not installed, or weights not downloadable
        if quiet:
            return None
        warnings.warn(f"LPIPS is not available ({type(e).__name__}); using the pseudo-Huber premetric alone",
                      stacklevel=2)
        return None


def lpips_distance(net, x: Tensor, y: Tensor) -> Tensor:
    """LPIPS on images in [-1, 1], grey images repeated to RGB and upsampled to 224 as in RF++ (per sample)."""
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x, size=224, mode="bilinear")
    y = torch.nn.functional.interpolate(y, size=224, mode="bilinear")
    return net(x, y).flatten()


class TeacherFeatureDistance(torch.nn.Module):
    """A perceptual distance that needs no download: LPIPS's form (Zhang et al. 2018, eq. 1, channel-normalised
    activations, squared differences averaged over positions, equal channel weights) on the frozen teacher's own
    features at `taps` (Teacher.feature_taps: a UNet's down and mid blocks, a transformer's blocks' image tokens),
    each image seen clean at the teacher's noise level `level` T (its features there describe images the teacher
    knows). Per sample; gradients flow into `x_hat` only."""

    def __init__(self, denoiser, taps, level: float = 0.1):
        super().__init__()
        self.denoiser, self.taps = denoiser, taps
        steps = len(denoiser.alphas_cumprod)
        self.sigma = float(denoiser.t_to_sigma(torch.tensor(round(level * (steps - 1)))))

    def features(self, x: Tensor, cond) -> list[Tensor]:
        with contextlib.ExitStack() as stack:
            captured = [stack.enter_context(tap.capture(self.denoiser.model)) for tap in self.taps]
            self.denoiser(x, self.sigma, cond)
        return [f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for out in captured for f in out]

    def forward(self, x_hat: Tensor, x: Tensor, cond=None) -> Tensor:
        with torch.no_grad():
            target = self.features(x, cond)
        return sum((a - b).pow(2).sum(1).flatten(1).mean(1) for a, b in zip(self.features(x_hat, cond), target))
