"""Robust and perceptual distances shared by the flow and consistency methods."""
from __future__ import annotations

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


def load_lpips(device) -> "torch.nn.Module | None":
    """LPIPS (VGG) when the `lpips` package and its weights can be loaded, else None (with one warning)."""
    try:
        import lpips  # optional: not a dependency of dstudio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
        net.requires_grad_(False)
        return net
    except Exception as e:  # not installed, or weights not downloadable
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
