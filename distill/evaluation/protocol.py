"""The embedded benchmark protocol every evaluation uses (the end-of-run comparison, the app, the benchmarks).

2,000 generated images (200 per class, fixed noise from seed 0) against MNIST-5k, FID in a named feature space
(`mnist` unless said otherwise); the floor is 2,000 real MNIST-5k images (200 per class) against all of MNIST-5k.
Speed is the wall time of the whole pipeline call, measured in the same run as the rows it is compared with.
"""
from __future__ import annotations

import time

import torch

from dstudio.distill.evaluation.spaces import FeatureSpace, feature_space
from dstudio.distill.evaluation.stats import Stats, mnist_reference

N_PER_CLASS = 200
NUM_CLASSES = 10
NOISE_SEED = 0
BATCH_SIZE = 500  # images per pipeline call; re-noising samplers draw from a generator seeded per batch


def protocol_labels(num_classes: int = NUM_CLASSES, per_class: int = N_PER_CLASS) -> torch.Tensor:
    """Labels 0..num_classes-1 in blocks of `per_class` (dropped for unconditional pipelines)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def protocol_noise(shape: tuple[int, ...], n: int, seed: int = NOISE_SEED) -> torch.Tensor:
    """The same standard-normal starting noise for every row of every benchmark."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def timed(fn, *args, **kwargs):
    """(result, seconds), synchronising CUDA around the call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


class Unconditional:
    """An unconditional pipeline called like a class-conditional one: the protocol's labels become its batch size."""

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, scheduler):
        self.pipe.scheduler = scheduler

    def __call__(self, class_labels=None, **kwargs):
        return self.pipe(batch_size=len(class_labels), **kwargs)


def is_conditional(pipe) -> bool:
    """Whether a pixel-space pipeline takes class labels (its UNet has class embeddings)."""
    return bool(getattr(pipe.unet.config, "num_class_embeds", None))


def protocol_pipeline(pipe):
    """`pipe` as the protocol calls it: class-conditional ones as they are, unconditional ones wrapped."""
    return pipe if isinstance(pipe, Unconditional) or is_conditional(pipe) else Unconditional(pipe)


def pipeline_images(pipe, labels: torch.Tensor, noise: torch.Tensor, steps: int | None, batch_size: int = BATCH_SIZE,
                    guidance_scale: float = 1.0, progress=None, **kwargs) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] from a pixel-space pipeline on fixed noise (labels dropped when it is unconditional), and
    the wall time in seconds; `progress(fraction)` is called before each batch. Samplers that re-noise (few-step
    students) draw from a generator seeded per batch, so every figure is reproducible."""
    pipe = protocol_pipeline(pipe)
    chunks, seconds = [], 0.0
    for i in range(0, len(labels), batch_size):
        if progress is not None:
            progress(i / len(labels))
        gen = torch.Generator(noise.device).manual_seed(NOISE_SEED + 1 + i)
        out, dt = timed(pipe, class_labels=labels[i:i + batch_size], latents=noise[i:i + batch_size],
                        num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt", generator=gen,
                        **kwargs)
        chunks.append(out.images * 2 - 1)
        seconds += dt
    return torch.cat(chunks), seconds


def sample_shape(pipe) -> tuple[int, int, int]:
    """(C, H, W) of a pixel-space pipeline's samples."""
    cfg = pipe.unet.config
    return cfg.in_channels, cfg.sample_size, cfg.sample_size


def protocol_reference(features: str, resolution: int) -> tuple[FeatureSpace, Stats]:
    """The feature space (on the CPU) and the MNIST-5k reference statistics at `resolution`."""
    space = feature_space(features, "cpu")
    return space, mnist_reference(space, resolution)


def real_floor(space: FeatureSpace, ref: Stats, resolution: int) -> dict:
    """Real-vs-real FID at the protocol's sizes: 200 real images per class (seeded) against all of MNIST-5k."""
    from dstudio.distill.data import mnist5k
    from dstudio.distill.evaluation.fid import fid_of_tensor

    data = mnist5k(resolution, seed=1)
    idx = torch.cat([(data.labels == c).nonzero()[:N_PER_CLASS, 0] for c in range(NUM_CLASSES)])
    return fid_of_tensor(data.images[idx], ref, space, "mnist5k-real-2000")


def protocol_description(per_class: int = N_PER_CLASS, batch_size: int = BATCH_SIZE) -> dict:
    """The protocol's fields of an FID fingerprint: its labels, the starting noise's seed and the samplers' seeds."""
    return {"labels": f"{per_class} per class, classes 0-{NUM_CLASSES - 1} in blocks (unconditional pipelines: none)",
            "noise_seed": NOISE_SEED,
            "sampler_seeds": f"{NOISE_SEED + 1} + the index of each batch's first image (batches of {batch_size})"}


def protocol_fingerprint(space: FeatureSpace, ref: Stats, per_class: int = N_PER_CLASS,
                         batch_size: int = BATCH_SIZE) -> dict:
    """The fingerprint of an FID on the protocol's `per_class` x 10 images in `space` against `ref`."""
    from dstudio.distill.evaluation.fingerprint import fingerprint

    return fingerprint(space, ref, per_class * NUM_CLASSES, **protocol_description(per_class, batch_size))


def protocol_inputs(pipe, per_class: int = N_PER_CLASS) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's labels and fixed starting noise for a pixel-space pipeline, `per_class` images per class."""
    labels = protocol_labels(per_class=per_class)
    return labels, protocol_noise(sample_shape(pipe), len(labels))


def protocol_for(pipe, per_class: int = N_PER_CLASS, floor: bool = True, features: str = "mnist") -> dict:
    """The embedded protocol for a pixel-space pipeline: labels, fixed noise, feature space, reference, the
    fingerprint of its FIDs (space -> fingerprint, as results files keep it) and (with `floor`) the real-vs-real
    FID floor."""
    labels, noise = protocol_inputs(pipe, per_class)
    space, ref = protocol_reference(features, noise.shape[-1])
    proto = {"labels": labels, "noise": noise, "space": space, "ref": ref,
             "fingerprint": {features: protocol_fingerprint(space, ref, per_class)}}
    if floor:
        proto["floor"] = real_floor(space, ref, noise.shape[-1])["fid"]
    return proto
