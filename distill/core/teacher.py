"""Loading a pretrained diffusers pipeline as a teacher: its denoiser, conditioning and decoder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dstudio.distill.core.denoiser import CFGDenoiser, DiscreteDenoiser
from dstudio.distill.core.errors import UserError

DEFAULT_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "mnist16-teacher"
SUPPORTED = ("DDPMPipeline-style: a UNet2DModel (unconditional or class-conditional) + a DDPM-family scheduler",
             "StableDiffusionPipeline-style: UNet2DConditionModel + vae + text_encoder + tokenizer + scheduler")


class TeacherError(UserError):
    """The given path or id is not a teacher dstudio can use; the message says what would be."""


@dataclass
class Teacher:
    """A frozen pretrained pipeline seen as a Denoiser over sigma, with what is needed to condition and decode."""

    pipeline: object
    denoiser: DiscreteDenoiser
    kind: str  # "class", "uncond" or "text"
    num_classes: int
    sample_shape: tuple[int, int, int]
    source: str
    null_cond: Tensor | None = field(default=None)

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
    from dstudio.distill.core.export import CUSTOM_CLASS

    return json.loads((path / "model_index.json").read_text()).get("_class_name") == CUSTOM_CLASS


def load_dstudio_pipeline(path: str | Path, dtype=torch.float32):
    """Assemble a folder dstudio exported from its components, without executing the folder's own code.

    Plain diffusers loads the same folder with `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`.
    """
    import importlib

    from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    parts = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        module = f"dstudio.distill.core.{spec[0]}" if (path / name / f"{spec[0]}.py").is_file() else spec[0]
        cls = getattr(importlib.import_module(module), spec[1])
        kwargs = {"torch_dtype": dtype} if hasattr(cls, "dtype") and dtype != torch.float32 else {}
        parts[name] = cls.from_pretrained(path / name, **kwargs)
    options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}  # e.g. skips
    return DStudioPipeline(**parts, **options)


def load_pipeline(source: str | Path | None, device: str | torch.device = "cpu", dtype=torch.float32):
    """A diffusers pipeline from a local folder or a hub id, with a one-line error for every failure."""
    from diffusers import DiffusionPipeline

    source = str(source or DEFAULT_TEACHER)
    path = Path(source).expanduser()
    if _is_local(source):
        if not path.exists():
            raise TeacherError(f"teacher '{source}' does not exist: give a diffusers pipeline folder or a hub id")
        if not (path / "model_index.json").is_file():
            raise TeacherError(f"teacher '{source}' is not a diffusers pipeline folder (no model_index.json)")
        try:
            json.loads((path / "model_index.json").read_text())
        except json.JSONDecodeError as e:
            raise TeacherError(f"teacher '{source}' has a corrupt model_index.json ({e.msg})") from None
    try:
        if _is_local(source) and _is_dstudio_folder(path):
            pipe = load_dstudio_pipeline(path, dtype)
        else:
            kwargs = {"torch_dtype": dtype} if dtype != torch.float32 else {}
            pipe = DiffusionPipeline.from_pretrained(str(path) if _is_local(source) else source, **kwargs)
    except (OSError, ValueError, RuntimeError, AttributeError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherError(f"could not load pipeline '{source}': {first}") from None
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
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise TeacherError(f"unsupported scheduler {type(scheduler).__name__} ('{source}'): it has no discrete "
                           f"alphas_cumprod; supported: {'; '.join(SUPPORTED)}")
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    for p in unet.parameters():
        p.requires_grad_(False)
    unet.eval()
    denoiser = DiscreteDenoiser(unet, scheduler.alphas_cumprod, prediction_type)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (unet.config.in_channels, h, w)
    if isinstance(unet, UNet2DConditionModel):
        if not all(getattr(pipe, n, None) is not None for n in ("vae", "text_encoder", "tokenizer")):
            raise TeacherError(f"unsupported pipeline {type(pipe).__name__} ('{source}'): a UNet2DConditionModel "
                               f"needs vae, text_encoder and tokenizer; supported: {'; '.join(SUPPORTED)}")
        for module in (pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        teacher = Teacher(pipe, denoiser, "text", 0, shape, source)
        teacher.null_cond = teacher.encode_prompts([""])
        return teacher
    from dstudio.distill.core.routed_unet import RoutedUNet2DModel

    if not isinstance(unet, (UNet2DModel, RoutedUNet2DModel)):
        raise TeacherError(f"unsupported backbone {type(unet).__name__} ('{source}'); supported: {'; '.join(SUPPORTED)}")
    n = unet.config.num_class_embeds
    if n:
        # dstudio teachers keep one extra embedding, the null label, for classifier-free guidance.
        return Teacher(pipe, denoiser, "class", n - 1, shape, source, torch.tensor(n - 1))
    return Teacher(pipe, denoiser, "uncond", 0, shape, source)
