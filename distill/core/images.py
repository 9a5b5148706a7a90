"""Image tensors <-> PNG files and sample grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dstudio.distill.core.io import save_image


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> PIL images (L for one channel, RGB for three)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
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
