"""FID and KID results in a named feature space (`inception`, `mnist` or `pixels`) for image folders and tensors:
the figures, FID's 95% bootstrap interval (`fid_ci95`, its replicates in `fid_boot`), the protocol fingerprint, both
set sizes, the reference, versions and date, and a warning where FID is biased."""
from __future__ import annotations

import datetime
from pathlib import Path

import torch

from dstudio.distill.evaluation.fingerprint import UNKNOWN, fingerprint
from dstudio.distill.evaluation.interval import fid_interval
from dstudio.distill.evaluation.spaces import FeatureSpace, check_count, feature_space, folder_features, \
    scan_folder, tensor_features
from dstudio.distill.evaluation.stats import Stats, frechet, kid, reference_stats


def bias_warning(n: int, dim: int) -> str | None:
    if n <= dim:
        return (f"only {n} images for {dim}-dimensional features: the covariance is singular and FID is "
                f"strongly biased; use at least {dim + 1} (2,000+ for stable rankings)")
    if n < 2000:
        return f"{n} images: FID is biased upwards below about 2,000 images; compare only at equal N"
    return None


def result(gen: Stats, ref: Stats, space: FeatureSpace, skipped: list[str] | None = None,
           protocol: dict | None = None, **extra) -> dict:
    """The FID result of `gen` against `ref`; `protocol`: the fingerprint's labels, noise and sampler seeds
    (protocol.protocol_description; unknown for image folders)."""
    from dstudio.distill.core.export import versions

    fid = frechet(gen, ref)
    out = {
        "fid": fid,
        **(fid_interval(fid, gen.feats, ref) if gen.feats is not None else {}),
        "kid": kid(gen, ref),
        "features": space.name,
        "n_generated": gen.n,
        "n_reference": ref.n,
        "generated": gen.source,
        "reference": ref.source,
        "skipped_corrupt": skipped or [],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "fingerprint": {space.name: fingerprint(space, ref, gen.n, **(protocol or UNKNOWN))},
        **extra,
    }
    warning = bias_warning(gen.n, len(gen.mu))
    if warning:
        out["warning"] = warning
    if space.name == "mnist":
        from dstudio.distill.evaluation.features import feature_card

        out["feature_net_heldout_accuracy"] = feature_card().get("heldout_accuracy")
    return out


def fid_of_folder(images: str | Path, ref: str, features: str = "mnist", device=None,
                  save_ref_stats: str | Path | None = None) -> dict:
    from PIL import Image

    good, bad = scan_folder(images)
    check_count(len(good), str(images))
    space = feature_space(features, device)
    with Image.open(good[0]) as im:
        resolution = im.size[0]
    feats, skipped = folder_features(images, space)
    gen = Stats.of(feats, space.name, str(images))
    ref_stats = reference_stats(ref, space, resolution)
    if save_ref_stats:
        ref_stats.save(save_ref_stats)
    return result(gen, ref_stats, space, skipped)


def fid_of_features(feats, ref: Stats, space: FeatureSpace, source: str, protocol: dict | None = None,
                    **extra) -> dict:
    """The FID result of features already extracted in `space` (see `result`)."""
    return result(Stats.of(feats, space.name, source), ref, space, protocol=protocol, **extra)


def fid_of_tensor(images: torch.Tensor, ref: str | Stats, space: FeatureSpace, source: str,
                  protocol: dict | None = None, **extra) -> dict:
    """The FID result of images in [-1, 1] (see `result`): every benchmark row's `fid`, `fid_ci95` and `fid_boot`."""
    ref_stats = ref if isinstance(ref, Stats) else reference_stats(ref, space, images.shape[-1])
    return fid_of_features(tensor_features(images, space), ref_stats, space, source, protocol, **extra)
