"""FID and KID through clean-fid, in two named feature spaces: `inception` (the standard) and `mnist` (offline).

Folders go through clean-fid's `get_files_features`, in-memory images through its generator path
`get_model_features`; the distances are clean-fid's `frechet_distance` and `kernel_distance`.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dstudio.distill.core.errors import UserError

FEATURES = ("inception", "mnist")
EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy"}
MIN_IMAGES = 2  # a covariance needs two samples (2,000+ for FID values worth comparing)
CACHE = Path(os.environ.get("DSTUDIO_CACHE", Path.home() / ".cache" / "dstudio"))


class FIDError(UserError):
    """An FID input that cannot give a trustworthy number; the message says why and what would."""


@dataclass
class FeatureSpace:
    name: str
    model: torch.nn.Module
    fn_resize: object  # clean-fid's per-image resizer: HxWx3 uint8 -> resized float HxWx3 in [0, 255]
    dim: int
    device: torch.device


def feature_space(name: str, device: str | torch.device | None = None) -> FeatureSpace:
    from cleanfid.resize import build_resizer, make_resizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "mnist":
        from dstudio.app.features import FEATURE_DIM, load_feature_net

        return FeatureSpace(name, load_feature_net(device), make_resizer("PIL", False, "bicubic", (28, 28)),
                            FEATURE_DIM, device)
    if name == "inception":
        from cleanfid.features import build_feature_extractor

        try:
            model = build_feature_extractor("clean", device, use_dataparallel=False)
        except Exception as e:  # download or load failures come in many types
            raise FIDError(f"could not load clean-fid's InceptionV3 weights ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); "
                           f"with no network use --features mnist") from None
        return FeatureSpace(name, model, build_resizer("clean"), 2048, device)
    raise FIDError(f"unknown feature space '{name}': use one of {', '.join(FEATURES)}")


def scan_folder(folder: str | Path) -> tuple[list[str], list[str]]:
    """Image files of a folder (recursively, as clean-fid lists them), split into readable and corrupt ones."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"image folder '{folder}' does not exist")
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in EXTENSIONS)
    if not files:
        raise FIDError(f"image folder '{folder}' holds no images ({', '.join(sorted(EXTENSIONS))})")
    good, bad, sizes = [], [], {}
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                sizes.setdefault(im.size, f)
            good.append(f)
        except Exception:
            bad.append(f)
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise FIDError(f"images of mixed sizes in '{folder}': {f1} is {s1[0]}x{s1[1]}, {f2} is {s2[0]}x{s2[1]}")
    if not good:
        raise FIDError(f"no readable images in '{folder}' ({len(bad)} corrupt, e.g. {bad[0]})")
    return good, bad


def check_count(n: int, source: str) -> None:
    if n < MIN_IMAGES:
        raise FIDError(f"'{source}' gives {n} image(s): FID needs at least {MIN_IMAGES} for a covariance "
                       f"(2,000+ for stable values)")


def folder_features(folder: str | Path, space: FeatureSpace, batch_size: int = 256, verbose: bool = False):
    """Features of every readable image in `folder`; corrupt files are skipped and returned by name."""
    from cleanfid.fid import get_files_features

    good, bad = scan_folder(folder)
    feats = get_files_features(good, space.model, num_workers=0, batch_size=batch_size, device=space.device,
                               mode="clean", custom_fn_resize=space.fn_resize, verbose=verbose,
                               description=f"features {Path(folder).name}: ")
    return feats, bad


def tensor_features(images: torch.Tensor, space: FeatureSpace, batch_size: int = 256, verbose: bool = False):
    """Features of images in [-1, 1] (N, C, H, W), through clean-fid's generator path (uint8 quantisation included)."""
    from cleanfid.fid import get_model_features

    n = len(images)
    if n == 0:
        raise FIDError("no images to compute features of")
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    position = [0]

    def G(z):  # clean-fid asks for exactly batch_size images per call and truncates the surplus
        idx = (torch.arange(len(z)) + position[0]) % n
        position[0] += len(z)
        return u8[idx].float()

    return get_model_features(G, space.model, mode="clean", z_dim=1, num_gen=n, batch_size=min(batch_size, n),
                              device=space.device, verbose=verbose, custom_fn_resize=space.fn_resize)


@dataclass
class Stats:
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


def frechet(a: Stats, b: Stats) -> float:
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def kid(a: Stats, b: Stats, seed: int = 0) -> float | None:
    from cleanfid.fid import kernel_distance

    if a.feats is None or b.feats is None or min(len(a.feats), len(b.feats)) < 2:
        return None
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(a.feats, b.feats)
    finally:
        np.random.set_state(state)


def bias_warning(n: int, dim: int) -> str | None:
    if n <= dim:
        return (f"only {n} images for {dim}-dimensional features: the covariance is singular and FID is "
                f"strongly biased; use at least {dim + 1} (2,000+ for stable rankings)")
    if n < 2000:
        return f"{n} images: FID is biased upwards below about 2,000 images; compare only at equal N"
    return None


def result(gen: Stats, ref: Stats, space: FeatureSpace, skipped: list[str] | None = None, **extra) -> dict:
    from dstudio.distill.core.export import versions

    out = {
        "fid": frechet(gen, ref),
        "kid": kid(gen, ref),
        "features": space.name,
        "n_generated": gen.n,
        "n_reference": ref.n,
        "generated": gen.source,
        "reference": ref.source,
        "skipped_corrupt": skipped or [],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **extra,
    }
    warning = bias_warning(gen.n, space.dim)
    if warning:
        out["warning"] = warning
    if space.name == "mnist":
        from dstudio.app.features import feature_card

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


def fid_of_tensor(images: torch.Tensor, ref: str | Stats, space: FeatureSpace, source: str, **extra) -> dict:
    gen = Stats.of(tensor_features(images, space), space.name, source)
    ref_stats = ref if isinstance(ref, Stats) else reference_stats(ref, space, images.shape[-1])
    return result(gen, ref_stats, space, **extra)
