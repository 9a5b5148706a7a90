"""FID's error bar: Efron's bootstrap over the generated images, and the rule that says whether two figures of one
protocol differ.

Every replicate resamples the n generated features with replacement (B = BOOTSTRAP_B resamples drawn from seed
BOOTSTRAP_SEED, so two sets of the same size share their resampling indices) and takes their Fréchet distance to the
fixed reference statistics. Resampling with replacement repeats images, which adds about tr(Sigma) / n to every
replicate (the mean term) and more near the floor: the replicates sit above the figure they resample (4x at the
real-vs-real floor), so their plain percentile interval can miss the figure itself. The interval here is the
percentile interval moved by the bootstrap's bias estimate, mean(replicates) - figure (Efron & Tibshirani 1993,
ch. 10): the figure plus the replicates' spread about their mean, clipped at 0. It measures the spread of the
generated set only (the reference is fixed and shared by every row of a protocol). Checked on the shipped teacher
against 10 seed sets of 2,000 images: the bootstrap's standard deviation matches the spread across seed sets far from
the floor (DDIM-4, FID-mnist 0.25: 0.029 vs 0.030) and is twice it near the floor (DDIM-16, 0.047: 0.017 vs 0.008),
so there "not significant" errs on the side of saying so; paired differences (DDIM-4 minus DDIM-16, same noise) come
out at 0.019 vs 0.023 in FID-mnist and 0.013 vs 0.014 in FID-pixels.
Cost: one covariance and one d x d eigendecomposition per replicate; B = 200 takes about 1 s for 2,000 images in
the 128-d `mnist` space and 3 s in the 256-d `pixels` space of 16 px images on one busy core (32 px: 1,024-d, about
a minute).
"""
from __future__ import annotations

import numpy as np

from dstudio.distill.evaluation.stats import Stats, frechet_psd, psd_sqrt

BOOTSTRAP_B = 200
BOOTSTRAP_SEED = 0
LEVEL = 0.95
STORED_DIGITS = 6  # significant digits of each replicate kept in result files (paired comparisons read them)


def resample_indices(n: int, b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(b, n) indices drawn with replacement (Efron's bootstrap); the same (n, b, seed) always gives the same ones."""
    if n < 2 or b < 2:
        raise ValueError(f"a bootstrap needs at least 2 images and 2 resamples (got {n} images, {b} resamples)")
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def fid_replicates(feats: np.ndarray, ref: Stats, b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """B bootstrap FIDs of the generated features against fixed reference statistics (Efron's bootstrap)."""
    x = np.asarray(feats, dtype=np.float64)
    x = x - x.mean(0)  # centred once: the resampled moments below lose no precision
    n, ref_sqrt = len(x), psd_sqrt(np.asarray(ref.sigma, dtype=np.float64))
    offset = np.asarray(feats, dtype=np.float64).mean(0)
    out = np.empty(b)
    for i, idx in enumerate(resample_indices(n, b, seed)):
        w = np.bincount(idx, minlength=n).astype(np.float64)
        mu = w @ x / n
        sigma = ((x * w[:, None]).T @ x - n * np.outer(mu, mu)) / (n - 1)
        out[i] = frechet_psd(mu + offset, sigma, ref, ref_sqrt)
    return out


def shifted_interval(estimate: float, replicates, level: float = LEVEL) -> list[float]:
    """The bootstrap percentile interval moved by the bias estimate mean(replicates) - estimate (Efron &
    Tibshirani 1993, ch. 10): [estimate + q_lo - mean, estimate + q_hi - mean]."""
    reps = np.asarray(replicates, dtype=np.float64)
    if reps.ndim != 1 or len(reps) < 2 or not np.isfinite(reps).all():
        raise ValueError(f"an interval needs at least 2 finite bootstrap replicates (got {reps.size})")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(reps, [tail, 100 - tail]) - reps.mean() + estimate
    return [float(lo), float(hi)]


def fid_interval(estimate: float, feats: np.ndarray, ref: Stats, b: int = BOOTSTRAP_B,
                 seed: int = BOOTSTRAP_SEED) -> dict:
    """`fid_ci95` (the bias-shifted percentile interval, clipped at 0 or at a figure round-off made negative) and
    `fid_boot` (the replicates, for paired comparisons) of an FID figure (Efron's bootstrap over the generated
    images)."""
    reps = fid_replicates(feats, ref, b, seed)
    lo, hi = shifted_interval(estimate, reps)
    return {"fid_ci95": [max(lo, min(estimate, 0.0)), hi], "fid_boot": [float(f"{r:.{STORED_DIGITS}g}") for r in reps]}


def fid_fields(result: dict, key: str = "fid") -> dict:
    """A row's fields for one FID result under `key`: the figure, `KEY_ci95` and `KEY_boot` (those it has)."""
    return {key + suffix: result["fid" + suffix] for suffix in ("", "_ci95", "_boot") if "fid" + suffix in result}


def _figure(row: dict, key: str) -> tuple[float, list[float]]:
    if row.get(key) is None or not row.get(f"{key}_ci95"):
        raise ValueError(f"row '{row.get('name', '?')}' has no {key} with a {key}_ci95 interval to compare")
    return float(row[key]), row[f"{key}_ci95"]


def significant(a: dict, b: dict, key: str = "fid", paired: bool = False) -> bool:
    """Whether two FIDs of one protocol differ at 95% (Efron's bootstrap). Paired (both sets from the same noise,
    labels and image count, so their replicates share resampling indices): the bias-shifted percentile interval of
    the replicates' differences excludes 0. Otherwise: the two intervals do not overlap (conservative)."""
    fa, ca = _figure(a, key)
    fb, cb = _figure(b, key)
    if not paired:
        return ca[1] < cb[0] or cb[1] < ca[0]
    ra, rb = a.get(f"{key}_boot"), b.get(f"{key}_boot")
    if not ra or not rb or len(ra) != len(rb):
        raise ValueError(f"a paired comparison needs both rows' {key}_boot replicates, of equal length "
                         f"({len(ra or [])} and {len(rb or [])})")
    lo, hi = shifted_interval(fa - fb, np.asarray(ra) - np.asarray(rb))
    return lo > 0 or hi < 0
