"""The protocol fingerprint of an FID figure: which feature network and weights, which reference statistics, how many
images from which seeds and labels, how they were resized, and how the interval was drawn. Two figures are
comparable only when their fingerprints' `id` agree (every field but the dstudio version)."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from dstudio.distill.evaluation.interval import BOOTSTRAP_B, BOOTSTRAP_SEED, LEVEL
from dstudio.distill.evaluation.spaces import FeatureSpace
from dstudio.distill.evaluation.stats import Stats

UNKNOWN = {"labels": "unknown (an image set, not the protocol's)", "noise_seed": None, "sampler_seeds": None}


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, mtime: float, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path | None) -> str | None:
    """sha256 of a file (cached per path, size and modification time); None when there is no such file."""
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return _file_sha256(str(path), st.st_mtime, st.st_size)


def stats_sha256(stats: Stats) -> str:
    """sha256 of the reference's mean and covariance (float64 bytes): the statistics themselves, not their file."""
    digest = hashlib.sha256()
    for a in (stats.mu, stats.sigma):
        digest.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return digest.hexdigest()


def fingerprint(space: FeatureSpace, ref: Stats, n: int, labels: str = UNKNOWN["labels"],
                noise_seed: int | None = None, sampler_seeds: str | None = None) -> dict:
    """The fields that decide an FID figure, with `id`: a hash of all of them but the dstudio version."""
    from importlib.metadata import version

    fields = {"features": space.name, "weights_sha256": file_sha256(space.weights), "resize": space.resize,
              "reference": ref.source, "reference_sha256": stats_sha256(ref), "n_reference": int(ref.n),
              "n_generated": int(n), "labels": labels, "noise_seed": noise_seed, "sampler_seeds": sampler_seeds,
              "interval": {"method": "bootstrap over generated images, bias-shifted percentile",
                           "resamples": BOOTSTRAP_B, "seed": BOOTSTRAP_SEED, "level": LEVEL}}
    fields["id"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {**fields, "dstudio": version("dstudio")}


def same_noise(a: dict | None, b: dict | None) -> bool:
    """Whether two fingerprints name one protocol drawn from known noise: figures on it pair image by image."""
    return bool(a and b and a.get("id") == b.get("id") and a.get("noise_seed") is not None)


def describe(fp: dict) -> str:
    """One line: `mnist (weights 1a2b3c4d), reference mnist5k@16px (9f8e7d6c, 5,000), 2,000 images, noise seed 0,
    bootstrap B=200`."""
    weights = f"weights {fp['weights_sha256'][:8]}" if fp.get("weights_sha256") else "no weights"
    seed = "" if fp.get("noise_seed") is None else f", noise seed {fp['noise_seed']}"
    return (f"{fp['features']} ({weights}), reference {fp['reference']} ({fp['reference_sha256'][:8]}, "
            f"{fp['n_reference']:,}), {fp['n_generated']:,} images{seed}, bootstrap B={fp['interval']['resamples']} "
            f"[id {fp['id']}]")
