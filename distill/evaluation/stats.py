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


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative eigenvalues of round-off clipped to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_psd(mu: np.ndarray, sigma: np.ndarray, ref: Stats, ref_sqrt: np.ndarray | None = None) -> float:
    """Fréchet distance (Heusel et al. 2017) with Tr (S S_r)^1/2 = sum of sqrt eig(S_r^1/2 S S_r^1/2): symmetric, so
    stable where clean-fid's sqrtm of S S_r is not (covariances of fewer images than dimensions)."""
    ref_sqrt = psd_sqrt(ref.sigma) if ref_sqrt is None else ref_sqrt
    eig = np.linalg.eigvalsh(ref_sqrt @ sigma @ ref_sqrt)
    return float(np.sum((mu - ref.mu) ** 2) + np.trace(sigma) + np.trace(ref.sigma)
                 - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


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


def mnist_class_reference(space: FeatureSpace, resolution: int) -> dict[int, Stats]:
    """Statistics of each digit's MNIST-5k images at `resolution` (label -> Stats), cached beside the global ones."""
    from dstudio.distill.data import mnist5k

    paths = {c: CACHE / f"mnist5k-{space.name}-{resolution}px-class{c}.npz" for c in range(10)}
    if all(p.is_file() for p in paths.values()):
        return {c: Stats.load(p) for c, p in paths.items()}
    data = mnist5k(resolution)
    feats = tensor_features(data.images, space)
    out = {}
    for c, path in paths.items():
        out[c] = Stats.of(feats[(data.labels == c).numpy()], space.name, f"mnist5k@{resolution}px class {c}")
        out[c].save(path)
    return out


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
