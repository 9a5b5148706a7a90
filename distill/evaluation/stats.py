"""Feature statistics (mean, covariance, the features for KID), their Fréchet and kernel distances, and the
reference sets: MNIST-5k (cached per space and resolution), a saved .npz, or an image folder."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dstudio.distill.evaluation.spaces import FeatureSpace, FIDError, check_count, folder_features, tensor_features

CACHE = Path(os.environ.get("DSTUDIO_CACHE", Path.home() / ".cache" / "dstudio"))


@dataclass
class Stats:
    """Mean and covariance of one image set's features in one space (and the features themselves, for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None
    n: int
    features: str
    source: str

    @classmethod
    def of(cls, feats: np.ndarray, features: str, source: str, keep_feats: bool = True) -> "Stats":
        check_count(len(feats), source)
        return cls(np.mean(feats, axis=0), np.cov(feats, rowvar=False), feats if keep_feats else None,
                   len(feats), features, source)

    def save(self, path: str | Path) -> None:
        from dstudio.distill.core.io import atomic_path

        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, feats=self.feats if self.feats is not None else np.zeros(0),
                         n=self.n, features=self.features, source=self.source)

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        try:
            z = np.load(path, allow_pickle=False)
            feats = z["feats"] if z["feats"].size else None
            return cls(z["mu"], z["sigma"], feats, int(z["n"]), str(z["features"]), str(z["source"]))
        except Exception as e:
            raise FIDError(f"statistics file '{path}' is not a dstudio .npz ({type(e).__name__})") from None


def frechet(a: Stats, b: Stats) -> float:
    """Fréchet distance of two Gaussians (Heusel et al. 2017): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    from cleanfid.fid import frechet_distance

    with warnings.catch_warnings():  # pixel covariances are singular (constant borders); clean-fid offsets them
        warnings.filterwarnings("ignore", message="Matrix is singular")
        return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def kid(a: Stats, b: Stats, seed: int = 0) -> float | None:
    """Kernel inception distance (Bińkowski et al. 2018) through clean-fid, seeded; None without both features."""
    from cleanfid.fid import kernel_distance

    if a.feats is None or b.feats is None or min(len(a.feats), len(b.feats)) < 2:
        return None
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(a.feats, b.feats)
    finally:
        np.random.set_state(state)


def mnist_reference(space: FeatureSpace, resolution: int) -> Stats:
    """Statistics of all of MNIST-5k at the generated images' resolution, cached under ~/.cache/dstudio."""
    from dstudio.distill.data import mnist5k

    path = CACHE / f"mnist5k-{space.name}-{resolution}px.npz"
    if path.is_file():
        return Stats.load(path)
    feats = tensor_features(mnist5k(resolution).images, space)
    stats = Stats.of(feats, space.name, f"mnist5k@{resolution}px")
    stats.save(path)
    return stats


def reference_stats(ref: str, space: FeatureSpace, resolution: int | None = None) -> Stats:
    """REF: `mnist`, a saved statistics file (.npz), or an image folder."""
    if ref == "mnist":
        if resolution is None:
            raise FIDError("--ref mnist needs the generated images' resolution")
        return mnist_reference(space, resolution)
    path = Path(ref)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FIDError(f"statistics file '{ref}' does not exist")
        stats = Stats.load(path)
        if stats.features != space.name:
            raise FIDError(f"statistics file '{ref}' holds {stats.features} features, not {space.name}")
        return stats
    if path.is_dir():
        feats, _ = folder_features(path, space)
        return Stats.of(feats, space.name, str(path))
    raise FIDError(f"reference '{ref}' is neither 'mnist', a .npz statistics file nor an image folder")
