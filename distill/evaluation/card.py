"""The report card beside FID, where diversity lost to distillation shows: improved precision and recall
(Kynkäänniemi et al. 2019: k-NN manifolds, k = 3, generated features against as many real ones drawn with a fixed
seed) and per-class FID (class c's generated images against class c's real ones; skipped for unconditional
pipelines). A student that drops modes keeps its precision and loses recall; one that draws the right digits for
the wrong labels keeps a small global FID and gets large per-class ones."""
from __future__ import annotations

import numpy as np
import torch

from dstudio.distill.evaluation.stats import Stats, frechet_psd

K = 3
REAL_SEED = 0


def knn_radii(feats: torch.Tensor, k: int = K) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point: its ball in the k-NN manifold (Kynkäänniemi et al.
    2019)."""
    return torch.cdist(feats, feats).kthvalue(k + 1, dim=1).values  # k + 1: the point itself is at distance 0


def coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """The share of `points` inside the union of the manifold's balls (Kynkäänniemi et al. 2019, eq. 1-2)."""
    inside = [(torch.cdist(points[i:i + chunk], manifold) <= radii).any(1) for i in range(0, len(points), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = K) -> dict:
    """Improved precision (generated inside the real manifold) and recall (real inside the generated manifold),
    Kynkäänniemi et al. 2019, with k-NN balls of each set in the feature space."""
    real, fake = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs two (N, D) feature sets of one D (got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)})")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set "
                         f"(got {len(real)} real, {len(fake)} generated)")
    return {"precision": coverage(fake, real, knn_radii(real, k)), "recall": coverage(real, fake, knn_radii(fake, k))}


def real_subset(ref: Stats, n: int, seed: int = REAL_SEED) -> np.ndarray:
    """`n` of the reference's features drawn without replacement with `seed` (all of them when it has fewer)."""
    if ref.feats is None:
        raise ValueError(f"reference '{ref.source}' keeps no features for precision/recall (only mean and covariance)")
    return ref.feats[np.random.default_rng(seed).permutation(len(ref.feats))[:n]]


def class_fids(feats: np.ndarray, labels, class_refs: dict[int, Stats]) -> dict[str, float]:
    """FID (Heusel et al. 2017) of each class's generated features against that class's real statistics, in the
    symmetric form that stays finite for classes of fewer images than dimensions."""
    labels = np.asarray(labels)
    if len(labels) != len(feats):
        raise ValueError(f"{len(labels)} labels for {len(feats)} feature vectors")
    out = {}
    for c, ref in class_refs.items():
        gen = Stats.of(np.asarray(feats[labels == c], dtype=np.float64), ref.features, f"class {c}", keep_feats=False)
        out[str(c)] = frechet_psd(gen.mu, gen.sigma, ref)
    return out


def card_entry(feats: np.ndarray, ref: Stats, labels=None, class_refs: dict[int, Stats] | None = None) -> dict:
    """One row's card in one space: precision / recall against a seeded real subset of its size and, given labels
    and per-class references, per-class FID (`class_fid`: class -> FID); sets too small for either get None."""
    if ref.feats is not None and min(len(feats), len(ref.feats)) > K:
        entry = precision_recall(real_subset(ref, len(feats)), feats)
    else:
        entry = {"precision": None, "recall": None}
    counts = np.bincount(np.asarray(labels), minlength=len(class_refs)) if labels is not None and class_refs else None
    entry["class_fid"] = class_fids(feats, labels, class_refs) if counts is not None and counts.min() >= 2 else None
    return entry


def card_header(n: int, n_reference: int, per_class: int, conditional: bool) -> dict:
    """What a card was measured on, and why per-class FID is missing where it is."""
    if not conditional:
        per_class_note = "skipped: an unconditional pipeline has no class labels to split its images by"
    elif per_class < 2:
        per_class_note = "skipped: per-class FID needs at least 2 images per class"
    else:
        per_class_note = (f"{per_class} generated images per class against that class's MNIST-5k images; biased "
                          f"upwards at so few images: compare rows and classes, not with the global FID")
    return {"k": K, "real_subset": f"{min(n, n_reference):,} of the {n_reference:,} reference images, drawn with "
                                   f"seed {REAL_SEED} (as many as generated)",
            "per_class": per_class_note, "rows": {}}


def with_card(rows: list[dict], card: dict | None, space: str) -> list[dict]:
    """The rows with `precision` and `recall` of their card entry in `space` (rows without one unchanged)."""
    entries = (card or {}).get("rows", {})
    return [{**r, **{m: entries[r["name"]][space].get(m) for m in ("precision", "recall")}}
            if space in entries.get(r.get("name"), {}) else r for r in rows]
