"""Image tensors <-> PNG files and sample grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dstudio.distill.core.io import save_image


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 [0, 255] on the CPU (clamped, rounded): what a PNG or clean-fid sees."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> PIL images (L for one channel, RGB for three)."""
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def grid(images: Tensor, nrow: int, pad: int = 1) -> Image.Image:
    """Rows of `nrow` images, one pixel of padding between them."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
    for i, img in enumerate(images.detach().float().cpu()):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    return to_pil(canvas[None])[0]


def collapse_reason(images: Tensor, end: float = 0.98, max_ends: float = 0.95, min_std: float = 0.02) -> str | None:
    """Why images in [-1, 1] look collapsed, or None: saturated (more than `max_ends` of all pixels at the range ends;
    MNIST itself has at most 90% per image) or constant (most images with per-image std below `min_std`)."""
    x = images.detach().float().flatten(1)
    ends = (x.abs() >= end).float().mean().item()
    if ends > max_ends:
        return f"saturated: {ends:.0%} of pixels at the range ends"
    flat = (x.std(1) < min_std).float().mean().item() if x.shape[1] > 1 else 0.0
    if flat > 0.5:
        return f"constant: {flat:.0%} of images have near-zero variance"
    return None


def save_grid(images: Tensor, path: str | Path, nrow: int, upscale: int = 1) -> Path:
    img = grid(images, nrow)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    save_image(img, path)
    return Path(path)


def save_pngs(images: Tensor, out_dir: str | Path, prefix: str = "", start: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    for i, img in enumerate(to_pil(images)):
        p = out_dir / f"{prefix}{start + i:06d}.png"
        save_image(img, p)
        paths.append(p)
    return paths


def load_png_tensor(path: str | Path) -> Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1)
