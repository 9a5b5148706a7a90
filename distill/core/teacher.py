"""Loading a pretrained diffusers pipeline as a teacher: its denoiser, conditioning and decoder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dstudio.distill.core.conditioning import Conditioning
from dstudio.distill.core.denoiser import MAX_START_GAIN, CFGDenoiser, ClippedDenoiser, DiscreteDenoiser
from dstudio.distill.core.errors import UserError, one_line
from dstudio.distill.core.family import FAMILIES, Family, FeatureTap, family_of
from dstudio.distill.core.family import stock_scheduler as reference_scheduler  # noqa: F401  (its one owner)

DEFAULT_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "mnist16-teacher"
SUPPORTED = ("DDPMPipeline-style: a UNet2DModel (unconditional or class-conditional) + a DDPM-family scheduler "
             "or FlowMatchEulerDiscreteScheduler",
             "the pipelines StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, PixArtSigma, PixArtAlpha, DiT")
IMAGE_COMPONENTS = {"unet": ("UNet2DModel",), "scheduler": None}  # None: any DDPM-family or flow-matching scheduler


class TeacherError(UserError):
    """The given path or id is not a teacher dstudio can use; the message says what would be."""


@dataclass
class Teacher:
    """A frozen pretrained pipeline seen through its family adapter (families.py): a Denoiser over sigma, the
    conditions it takes (class labels, prompts or none) with its null condition for classifier-free guidance, its
    images (the VAE of latent families) and its export. Methods see only these; they never ask which family."""

    pipeline: object
    family: Family
    source: str = "<pipeline>"
    denoiser: DiscreteDenoiser = field(init=False)
    clipping: dict | None = field(init=False)  # the scheduler's clip_sample / thresholding, as ClippedDenoiser kwargs
    null_cond: Conditioning | None = field(init=False)  # None: an unconditional teacher (no guidance)

    def __post_init__(self):
        self.denoiser, self.clipping, self.null_cond = self.family.denoiser(), self.family.clipping, None
        with torch.no_grad():
            self.null_cond = self.family.null()

    @property
    def network(self) -> nn.Module:
        """The denoising network: a UNet, or the family's transformer."""
        return self.family.network

    @property
    def unet(self) -> nn.Module:
        """The denoising network under the name methods written before the families use (a transformer for the
        transformer families)."""
        return self.family.network

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def num_train_timesteps(self) -> int:
        return self.denoiser.schedule.num_train_timesteps

    @property
    def num_classes(self) -> int:
        """The class labels it takes (0: prompts or nothing)."""
        return self.family.num_classes

    @property
    def takes_prompts(self) -> bool:
        return self.family.takes_prompts

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the denoiser's state: pixels, or the VAE's latents (unpacked)."""
        return self.family.sample_shape

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the teacher makes: the VAE's output for latent teachers."""
        return self.family.pixel_shape

    def guided(self, guidance_scale: float):
        """The teacher's denoiser with classifier-free guidance (w = 1: the plain denoiser)."""
        if guidance_scale == 1.0 or self.null_cond is None:
            return self.denoiser
        return CFGDenoiser(self.denoiser, guidance_scale, self.null_cond)

    def for_sampling(self, guidance_scale: float = 1.0):
        """The guided denoiser as the teacher's own scheduler samples it: clip_sample / thresholding applied to x0."""
        guided = self.guided(guidance_scale)
        return ClippedDenoiser(guided, **self.clipping) if self.clipping else guided

    def student(self, model, max_gain: float = MAX_START_GAIN) -> DiscreteDenoiser:
        """A trainable backbone (a copy of the teacher's, or a smaller one) as a student denoiser: the teacher's
        parameterisation and sampling clip, from its `start_t(max_gain)` down (a copy of the teacher starts as the
        teacher)."""
        return self.denoiser.student(model, self.clipping, max_gain)

    @torch.no_grad()
    def conditions(self, prompts: list[str] | None = None) -> Conditioning:
        """The table of conditions a batch's ids index: the prompts' (required by a text-to-image teacher), the class
        labels' (row i: label i), or none (an unconditional teacher)."""
        if self.takes_prompts:
            if not prompts:
                raise TeacherError(f"teacher '{self.source}' is text-to-image: it needs prompts")
            parts = [self.family.encode_prompts(prompts[i:i + 64]) for i in range(0, len(prompts), 64)]
            return Conditioning.cat(parts)
        return self.cond(torch.arange(self.num_classes)) if self.num_classes else Conditioning()

    def cond(self, labels: Tensor | None) -> Conditioning:
        """The condition of a batch's class labels (the empty one for an unconditional teacher); a text-to-image
        teacher's conditions are rows of a table of prompts (`conditions`)."""
        if self.takes_prompts:
            raise TeacherError(f"teacher '{self.source}' is text-to-image: its conditions come from prompts")
        return self.family.encode_labels(labels) if self.num_classes and labels is not None else Conditioning()

    def check_class(self, label: int) -> int:
        if not self.num_classes:
            raise TeacherError(f"--class {label} was given but teacher '{self.source}' is not class-conditional")
        if not 0 <= label < self.num_classes:
            raise TeacherError(f"class {label} is outside the teacher's labels 0..{self.num_classes - 1}")
        return label

    def to_model_space(self, data):
        """Real images as teacher samples (for latent teachers the scaled VAE posterior means) with labels the teacher
        takes: a captioned set's caption ids, or class ids (class folders named by integers are those classes)."""
        if self.takes_prompts and not data.captions:
            raise TeacherError(f"data '{data.name}' has no captions, which text-to-image teacher '{self.source}' "
                               f"needs: give an image folder with metadata.jsonl ({{\"file_name\", \"text\"}} per line)")
        if self.num_classes:
            data = dataclasses.replace(data, labels=class_ids(data, self.num_classes))
        if self.family.pixel_space:
            return data
        with torch.no_grad():
            latents = [self.family.encode(chunk).cpu() for chunk in data.images.split(64)]
        return dataclasses.replace(data, images=torch.cat(latents))

    def decode(self, x: Tensor) -> Tensor:
        """Model space -> images in [-1, 1] (the VAE decoder for latent teachers)."""
        return self.family.decode(x)

    def export(self, network: nn.Module, scheduler, path, **info) -> Path:
        """A student (or the teacher's own network with a searched schedule) as the family's own pipeline folder."""
        return self.family.export(network, scheduler, path, **info)

    @property
    def feature_tap(self) -> FeatureTap:
        """Where the GAN head of DMD2 / MSD reads the network's features."""
        return self.family.feature_tap()

    @property
    def feature_taps(self) -> list[FeatureTap]:
        """Where the teacher-feature perceptual distance (losses.TeacherFeatureDistance) reads the network."""
        return self.family.feature_taps()


def class_ids(data, num_classes: int) -> Tensor:
    """A labelled set's labels as the teacher's class ids: class folders named by integers are those classes
    (DiT's ImageNet ids), others keep their sorted index; every id must be one of the teacher's classes."""
    names = list(data.class_names)
    ids = data.labels
    if names and all(n.isdigit() for n in names):
        ids = torch.tensor([int(n) for n in names])[data.labels]
    if len(ids) and int(ids.max()) >= num_classes:
        raise TeacherError(f"data '{data.name}' has class {int(ids.max())}, outside the teacher's labels "
                           f"0..{num_classes - 1}")
    return ids


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") != 1


def _is_dstudio_folder(path: Path) -> bool:
    """A folder dstudio exported with its own classes inside (they load without running the folder's code)."""
    from dstudio.distill.core.export import CUSTOM_CLASS, shipped_module

    index = json.loads((path / "model_index.json").read_text())
    return index.get("_class_name") == CUSTOM_CLASS or any(
        isinstance(spec, list) and spec[0] and shipped_module(path / name, spec[0])
        for name, spec in index.items() if not name.startswith("_"))


def load_dstudio_pipeline(path: str | Path, dtype=torch.float32):
    """Assemble a folder dstudio exported from its components, with dstudio's own classes for the files it
    shipped, so the folder's code never runs. Plain diffusers loads the same folder with
    `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`."""
    import importlib

    import diffusers

    from dstudio.distill.core.export import CUSTOM_CLASS, shipped_module
    from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    pipeline_cls = DStudioPipeline if index["_class_name"] == CUSTOM_CLASS else getattr(diffusers, index["_class_name"])
    parts = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list) or spec[0] is None:  # a plain setting, or an absent optional component
            parts[name] = spec if not isinstance(spec, list) else None
            continue
        module = shipped_module(path / name, spec[0]) or spec[0]
        if module.split(".")[0] not in ("dstudio", "diffusers", "transformers"):
            raise ValueError(f"component {name} names library '{spec[0]}', which is not diffusers or transformers")
        cls = getattr(importlib.import_module(module), spec[1])
        kwargs = {"torch_dtype": dtype} if hasattr(cls, "dtype") and dtype != torch.float32 else {}
        if hasattr(cls, "dtype"):  # a model: dstudio writes safetensors only, so never fall back to a pickle
            kwargs["use_safetensors"] = True
        parts[name] = cls.from_pretrained(path / name, **kwargs)
    return pipeline_cls(**parts)


def _component_class(path: Path, name: str, spec) -> type:
    """The diffusers class a model_index.json entry names, or a one-line error naming the component."""
    import diffusers

    library, cls_name = spec
    cls = getattr(diffusers, cls_name, None) if library == "diffusers" else None
    allowed = IMAGE_COMPONENTS.get(name, ())
    usable = cls is not None and (cls_name in allowed if allowed is not None else _is_usable_scheduler(cls))
    if not usable:
        raise TeacherError(f"component '{name}' of '{path}' is {library}.{cls_name}, which dstudio cannot use; "
                           f"supported: {'; '.join(SUPPORTED)}")
    return cls


def _is_usable_scheduler(cls) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if not issubclass(cls, SchedulerMixin):
        return False
    import inspect

    return issubclass(cls, FlowMatchEulerDiscreteScheduler) or "beta_schedule" in inspect.signature(cls).parameters


def load_image_components(path: str | Path, dtype=torch.float32):
    """A DDPMPipeline-style folder assembled from its components (unet + scheduler), whatever pipeline class its
    model_index.json names: dstudio's pipeline class takes class labels, guidance and any scheduler."""
    from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    specs = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    parts = {}
    for name in ("unet", "scheduler"):
        if name not in specs:
            raise TeacherError(f"teacher '{path}' has no '{name}' component; supported: {'; '.join(SUPPORTED)}")
    for name, spec in specs.items():
        if name not in IMAGE_COMPONENTS:
            raise TeacherError(f"component '{name}' of '{path}' is {spec[0]}.{spec[1]}, which dstudio cannot use; "
                               f"supported: {'; '.join(SUPPORTED)}")
        cls = _component_class(path, name, spec)
        kwargs = {"torch_dtype": dtype} if name == "unet" and dtype != torch.float32 else {}
        parts[name] = cls.from_pretrained(path / name, **kwargs)
    return DStudioPipeline(**parts)


def _is_latent_family_folder(path: Path) -> bool:
    """A folder saved by a latent family's pipeline class (SD, SDXL, SD3, FLUX, PixArt, DiT): from_pretrained loads
    it; any other is assembled from its components as a DDPMPipeline-style folder."""
    import dstudio.distill.core.families  # noqa: F401  (the adapters register themselves)

    name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    cls = FAMILIES.get(name) if isinstance(name, str) else None
    return cls is not None and not cls.pixel_space


def load_pipeline(source: str | Path | None, device: str | torch.device = "cpu", dtype=torch.float32):
    """A diffusers pipeline from a local folder or a hub id, with a one-line error for every failure.

    Local image folders are assembled from their components (see load_image_components); text-to-image folders and
    hub ids go through DiffusionPipeline.from_pretrained."""
    from diffusers import DiffusionPipeline

    source = str(source or DEFAULT_TEACHER)
    path = Path(source).expanduser()
    if _is_local(source):
        if not path.exists():
            raise TeacherError(f"teacher '{source}' does not exist: give a diffusers pipeline folder or a hub id")
        if not (path / "model_index.json").is_file():
            raise TeacherError(f"teacher '{source}' is not a diffusers pipeline folder (no model_index.json)")
        try:
            index = json.loads((path / "model_index.json").read_text())
        except json.JSONDecodeError as e:
            raise TeacherError(f"teacher '{source}' has a corrupt model_index.json ({e.msg})") from None
        missing = [n for n, spec in index.items() if not n.startswith("_") and isinstance(spec, list)
                   and spec[0] is not None and not (path / n).is_dir()]
        if missing:  # checked here: diffusers would look for it on the hub
            raise TeacherError(f"teacher '{source}' lacks the component folder(s) {', '.join(missing)} named in its "
                               f"model_index.json")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(50)  # CRITICAL: a failure is reported as one line below, not by diffusers
    try:
        if _is_local(source) and _is_dstudio_folder(path):
            pipe = load_dstudio_pipeline(path, dtype)
        elif _is_local(source) and not _is_latent_family_folder(path):
            pipe = load_image_components(path, dtype)
        else:
            kwargs = {"torch_dtype": dtype} if dtype != torch.float32 else {}
            if _is_local(source):
                kwargs["local_files_only"] = True
            pipe = DiffusionPipeline.from_pretrained(str(path) if _is_local(source) else source, **kwargs)
    except TeacherError:
        raise
    except (OSError, ValueError, RuntimeError, AttributeError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherError(f"could not load pipeline '{source}': {first}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if type(pipe).__name__ == "DDPMPipeline":  # a hub DDPMPipeline: dstudio's own class takes labels and guidance
        from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

        pipe = DStudioPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_teacher(source: str | Path | None = None, device: str | torch.device = "cpu", dtype=torch.float32,
                 size: int | None = None) -> Teacher:
    """Load `source` (default: the shipped MNIST teacher) and wrap it as a frozen Teacher, sampled at `size` x `size`
    pixels (None: the pipeline's default)."""
    pipe = load_pipeline(source, device, dtype)
    return teacher_from_pipeline(pipe, str(source or DEFAULT_TEACHER), size, size)


def teacher_from_pipeline(pipe, source: str = "<pipeline>", height: int | None = None,
                          width: int | None = None) -> Teacher:
    """A loaded pipeline of a known family as a frozen Teacher (every network in eval mode, nothing trainable)."""
    try:
        family = family_of(pipe, height, width)
        if not family.pixel_space and getattr(pipe, "vae", None) is None:
            raise ValueError("a latent model needs its vae")
        for module in getattr(pipe, "components", {}).values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
                module.eval()
        return Teacher(pipe, family, source)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise TeacherError(f"unsupported pipeline {type(pipe).__name__} ('{source}'): {one_line(e)}; "
                           f"supported: {'; '.join(SUPPORTED)}") from None
