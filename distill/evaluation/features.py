"""The feature extractors of the FID spaces: `mnist`, a small digit classifier whose penultimate layer is the
embedding, and `pixels`, the raw grayscale pixels (no network).

Input contract (clean-fid's): float batches in [0, 255] of shape (B, 3, H, W); both average the channels. The
digit net resizes to 28x28 and returns (B, 128) features; `pixels` area-resizes to at most 32x32 and flattens.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS = Path(__file__).with_name("assets") / "mnist_features.pt"
CARD = WEIGHTS.with_suffix(".json")
FEATURE_DIM = 128
PIXELS_MAX_SIDE = 32  # the `pixels` space sees at most 32x32 (1,024-d): larger images are area-resized


class MnistFeatureNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 7
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 3
            nn.Flatten(), nn.Linear(128 * 9, FEATURE_DIM),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, 10))
        # RMS of the training features: FID/KID see O(1) values, as with Inception's pool features
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """[0, 255] (B, C, H, W) -> [-1, 1] (B, 1, 28, 28)."""
        x = x.float().mean(1, keepdim=True) / 127.5 - 1
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: Tensor) -> Tensor:
        """The 128-d layer before the classifier's ReLU (no dead units, so full-rank covariances), RMS-scaled."""
        return self.body(self.prepare(x)) / self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.prepare(x)))


class PixelFeatures(nn.Module):
    """The `pixels` space: grayscale in [0, 1], area-resized to at most 32x32, flattened (no weights)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.float().mean(1, keepdim=True) / 255
        size = tuple(min(s, PIXELS_MAX_SIDE) for s in x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="area")
        return x.flatten(1)


def load_feature_net(device="cpu") -> MnistFeatureNet:
    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"the mnist feature net is missing ({WEIGHTS}); train it with `dstudio features train`")
    net = MnistFeatureNet()
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False).to(device)


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts of up to 2 pixels and, for half the batch, a trip through 14-16 px (as 16x16 teachers see)."""
    b = len(x)
    dx, dy = (torch.randint(-2, 3, (2,), generator=generator)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    low = torch.rand(b, generator=generator) < 0.5
    if low.any():
        side = int(torch.randint(14, 17, (1,), generator=generator))
        small = F.interpolate(x[low], size=(side, side), mode="area")
        x[low] = F.interpolate(small, size=(28, 28), mode="bicubic", align_corners=False).clamp(-1, 1)
    return x


def train_feature_net(epochs: int = 12, seed: int = 0, holdout: float = 0.2, out: Path = WEIGHTS) -> dict:
    """Train on MNIST-5k minus a seeded held-out split; report accuracy on the split it never saw."""
    from tqdm.auto import tqdm

    from dstudio.distill.core.export import provenance
    from dstudio.distill.core.io import save_json, save_torch
    from dstudio.distill.data import mnist5k

    train, test = mnist5k(28).split(holdout, seed=1234)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MnistFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(train) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(total=steps, desc="mnist feature net")
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), 64):
            idx = perm[i:i + 64]
            x = _augment(train.images[idx].clone(), g)
            loss = F.cross_entropy(net.head(net.body(x)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    with torch.no_grad():
        net.feature_scale.fill_(net.body(train.images).pow(2).mean().sqrt())
        pred = net.head(net.body(test.images)).argmax(1)
        pred16 = net.head(net.body(F.interpolate(F.interpolate(test.images, size=(16, 16), mode="area"),
                                                 size=(28, 28), mode="bicubic").clamp(-1, 1))).argmax(1)
    card = provenance(
        heldout_accuracy=float((pred == test.labels).float().mean()),
        heldout_accuracy_16px=float((pred16 == test.labels).float().mean()),
        n_train=len(train), n_heldout=len(test), split="MNIST-5k, holdout 0.2, split seed 1234",
        epochs=epochs, seed=seed, feature_dim=FEATURE_DIM, command=f"dstudio features train --epochs {epochs}")
    save_torch(net.state_dict(), out)
    save_json(card, out.with_suffix(".json"))
    return card


def feature_card() -> dict:
    return json.loads(CARD.read_text()) if CARD.is_file() else {}
