"""Loading a pretrained diffusers pipeline as a teacher: its denoiser, conditioning and decoder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from dstudio.distill.core.denoiser import (MAX_START_GAIN, PREDICTION_TYPES, CFGDenoiser, ClippedDenoiser, DiscreteDenoiser,
                                           FlowMatchDenoiser)
from dstudio.distill.core.errors import UserError
from dstudio.samplers.schedules import clipping_of, is_flow_matching

DEFAULT_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "mnist16-teacher"
SUPPORTED = ("DDPMPipeline-style: a UNet2DModel (unconditional or class-conditional) + a DDPM-family scheduler "
             "or FlowMatchEulerDiscreteScheduler",
             "StableDiffusionPipeline-style: UNet2DConditionModel + vae + text_encoder + tokenizer + scheduler")
IMAGE_COMPONENTS = {"unet": ("UNet2DModel",), "scheduler": None}  # None: any DDPM-family or flow-matching scheduler
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "vae")


class TeacherError(UserError):
    """The given path or id is not a teacher dstudio can use; the message says what would be."""


TeacherKind = Literal["class", "uncond", "text"]  # class-conditional, unconditional, text-to-image


@dataclass
class Teacher:
    """A frozen pretrained pipeline seen as a Denoiser over sigma, with what is needed to condition and decode."""

    pipeline: object
    denoiser: DiscreteDenoiser
    kind: TeacherKind
    num_classes: int
    sample_shape: tuple[int, int, int]
    source: str
    null_cond: Tensor | None = field(default=None)
    clipping: dict | None = field(default=None)  # the scheduler's clip_sample / thresholding, as ClippedDenoiser kwargs

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def num_train_timesteps(self) -> int:
        return self.denoiser.schedule.num_train_timesteps

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

    def cond(self, labels: Tensor, embeddings: Tensor | None = None):
        """The denoiser's condition for a batch's labels: the labels themselves for a class-conditional teacher,
        None for an unconditional one, and for a text teacher the rows of `embeddings` (prompt embeddings) they index."""
        if self.kind == "class":
            return labels
        if self.kind == "text":
            if embeddings is None:
                raise ValueError("a text-to-image teacher's condition needs the prompt embeddings the labels index")
            return embeddings[labels.to(embeddings.device)]
        return None

    def check_class(self, label: int) -> int:
        if self.kind != "class":
            raise TeacherError(f"--class {label} was given but teacher '{self.source}' is not class-conditional")
        if not 0 <= label < self.num_classes:
            raise TeacherError(f"class {label} is outside the teacher's labels 0..{self.num_classes - 1}")
        return label

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        tok, enc = self.pipeline.tokenizer, self.pipeline.text_encoder
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        with torch.no_grad():
            return enc(ids)[0]

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the teacher makes: the VAE's output for latent teachers."""
        if self.kind != "text":
            return self.sample_shape
        (_, h, w), f = self.sample_shape, self.pipeline.vae_scale_factor
        return self.pipeline.vae.config.out_channels, h * f, w * f

    def to_model_space(self, data):
        """Real images as teacher samples: for latent teachers the scaled VAE posterior means of a captioned set."""
        if self.kind != "text":
            return data
        if not data.captions:
            raise TeacherError(f"data '{data.name}' has no captions, which text-to-image teacher '{self.source}' "
                               f"needs: give an image folder with metadata.jsonl ({{\"file_name\", \"text\"}} per line)")
        vae = self.pipeline.vae
        with torch.no_grad():
            latents = [vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
                       for chunk in data.images.split(64)]
        return dataclasses.replace(data, images=torch.cat(latents) * vae.config.scaling_factor)

    def decode(self, x: Tensor) -> Tensor:
        """Model space -> images in [-1, 1] (the VAE decoder for latent teachers)."""
        if self.kind != "text":
            return x
        vae = self.pipeline.vae
        return vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample.float()


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


def _is_text_folder(path: Path) -> bool:
    index = json.loads((path / "model_index.json").read_text())
    return any(isinstance(index.get(k), list) and index[k][0] is not None for k in TEXT_COMPONENTS)


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
        elif _is_local(source) and not _is_text_folder(path):
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
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_teacher(source: str | Path | None = None, device: str | torch.device = "cpu", dtype=torch.float32) -> Teacher:
    """Load `source` (default: the shipped MNIST teacher) and wrap it as a frozen Teacher."""
    pipe = load_pipeline(source, device, dtype)
    return teacher_from_pipeline(pipe, str(source or DEFAULT_TEACHER))


def teacher_from_pipeline(pipe, source: str = "<pipeline>") -> Teacher:
    from diffusers import UNet2DConditionModel, UNet2DModel

    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None:
        raise TeacherError(f"unsupported pipeline {type(pipe).__name__} ('{source}'): it has no unet/scheduler; "
                           f"supported: {'; '.join(SUPPORTED)}")
    flow = is_flow_matching(scheduler.config)
    if (getattr(scheduler, "alphas_cumprod", None) is None and not flow) or (flow and isinstance(
            unet, UNet2DConditionModel)):
        raise TeacherError(f"unsupported scheduler {type(scheduler).__name__} ('{source}'): it has no discrete "
                           f"alphas_cumprod; supported: {'; '.join(SUPPORTED)}")
    for p in unet.parameters():
        p.requires_grad_(False)
    unet.eval()
    denoiser = _teacher_denoiser(unet, scheduler, source)
    clipping = clipping_of(scheduler.config)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (unet.config.in_channels, h, w)
    if isinstance(unet, UNet2DConditionModel):
        if not all(getattr(pipe, n, None) is not None for n in ("vae", "text_encoder", "tokenizer")):
            raise TeacherError(f"unsupported pipeline {type(pipe).__name__} ('{source}'): a UNet2DConditionModel "
                               f"needs vae, text_encoder and tokenizer; supported: {'; '.join(SUPPORTED)}")
        for module in (pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        teacher = Teacher(pipe, denoiser, "text", 0, shape, source, clipping=clipping)
        teacher.null_cond = teacher.encode_prompts([""])
        return teacher
    from dstudio.distill.core.pipeline_dstudio import classes_of
    from dstudio.distill.core.routed_unet import RoutedUNet2DModel

    if not isinstance(unet, (UNet2DModel, RoutedUNet2DModel)):
        raise TeacherError(f"unsupported backbone {type(unet).__name__} ('{source}'); supported: {'; '.join(SUPPORTED)}")
    n = classes_of(unet.config.num_class_embeds)
    if n:  # the null label (classifier-free guidance) is the class embedding after the classes
        return Teacher(pipe, denoiser, "class", n, shape, source, torch.tensor(n), clipping)
    return Teacher(pipe, denoiser, "uncond", 0, shape, source, clipping=clipping)


def _teacher_denoiser(unet, scheduler, source: str) -> DiscreteDenoiser:
    """The teacher's x0 denoiser: a flow-matching velocity model or a DDPM model of the scheduler's prediction type."""
    cfg = scheduler.config
    if is_flow_matching(scheduler.config):
        odd = [k for k in ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                           "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)]
        if odd:
            raise TeacherError(f"scheduler FlowMatchEulerDiscreteScheduler of '{source}' sets {odd[0]}, which dstudio "
                               f"cannot use: it takes a fixed shift only")
        return FlowMatchDenoiser(unet, cfg.num_train_timesteps, float(cfg.get("shift", 1.0)))
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise TeacherError(f"scheduler {type(scheduler).__name__} of '{source}' has prediction_type "
                           f"'{prediction_type}', which dstudio cannot use; use one of {', '.join(PREDICTION_TYPES)}")
    return DiscreteDenoiser(unet, scheduler.alphas_cumprod, prediction_type)


def reference_scheduler(scheduler):
    """The scheduler a teacher is evaluated with: DDIM (trailing, its clip/threshold settings kept) for the DDPM
    family, its own Euler for flow matching."""
    import diffusers

    if is_flow_matching(scheduler.config):
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return diffusers.DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
