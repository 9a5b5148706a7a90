"""The named feature spaces of FID and the features of image folders and tensors in them, through clean-fid.

Folders go through clean-fid's `get_files_features`, in-memory images through its generator path
`get_model_features`; each space brings its extractor and its per-image resizer (clean-fid's `custom_fn_resize`).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dstudio.distill.core.errors import UserError
from dstudio.distill.core.images import to_uint8

FEATURES = ("inception", "mnist", "pixels")
EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy"}
MIN_IMAGES = 2  # a covariance needs two samples (2,000+ for FID values worth comparing)


class FIDError(UserError):
    """An FID input that cannot give a trustworthy number; the message says why and what would."""


@dataclass
class FeatureSpace:
    """A named feature space: its extractor on a device, clean-fid's per-image resizer for it, its weights file and
    how images reach it (both for the protocol fingerprint)."""

    name: str
    model: torch.nn.Module
    fn_resize: object  # clean-fid's per-image resizer: HxWx3 uint8 -> resized float HxWx3 in [0, 255]
    device: torch.device
    weights: Path | None = None
    resize: str = ""


def native_size(image: np.ndarray) -> np.ndarray:
    """clean-fid's resizer for spaces that resize themselves: the image as float32, at its own size."""
    return image.astype(np.float32)


def _inception(device: torch.device) -> FeatureSpace:
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import build_resizer

    try:
        model = build_feature_extractor("clean", device, use_dataparallel=False)
    except Exception as e:  # download or load failures come in many types
        raise FIDError(f"could not load clean-fid's InceptionV3 weights ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); "
                       f"with no network use --features mnist or pixels") from None
    weights = Path("./" if platform.system() == "Windows" else "/tmp") / "inception-2015-12-05.pt"  # clean-fid's
    return FeatureSpace("inception", model, build_resizer("clean"), device, weights,
                        "uint8, clean-fid's clean resize (PIL bicubic) to 299x299")


def _mnist(device: torch.device) -> FeatureSpace:
    from cleanfid.resize import make_resizer

    from dstudio.distill.evaluation.features import WEIGHTS, load_feature_net

    return FeatureSpace("mnist", load_feature_net(device), make_resizer("PIL", False, "bicubic", (28, 28)), device,
                        WEIGHTS, "uint8, PIL bicubic to 28x28 (clean-fid), channel mean")


def _pixels(device: torch.device) -> FeatureSpace:
    from dstudio.distill.evaluation.features import PIXELS_MAX_SIDE, PixelFeatures

    return FeatureSpace("pixels", PixelFeatures().to(device), native_size, device, None,
                        f"uint8, channel mean, area-resized to at most {PIXELS_MAX_SIDE}x{PIXELS_MAX_SIDE}")


def feature_space(name: str, device: str | torch.device | None = None) -> FeatureSpace:
    """The feature space `name` (one of FEATURES) on `device` (default: CUDA when present)."""
    builders = {"inception": _inception, "mnist": _mnist, "pixels": _pixels}
    if name not in builders:
        raise FIDError(f"unknown feature space '{name}': use one of {', '.join(FEATURES)}")
    return builders[name](torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


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
    u8 = to_uint8(images)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    position = [0]

    def G(z):  # clean-fid asks for exactly batch_size images per call and truncates the surplus
        idx = (torch.arange(len(z)) + position[0]) % n
        position[0] += len(z)
        return u8[idx].float()

    return get_model_features(G, space.model, mode="clean", z_dim=1, num_gen=n, batch_size=min(batch_size, n),
                              device=space.device, verbose=verbose, custom_fn_resize=space.fn_resize)
