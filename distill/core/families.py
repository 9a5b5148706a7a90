"""Teachers by family: a diffusers pipeline seen by the core as a network call, a Conditioning, a VAE and an export.

A family adapter turns a loaded pipeline (StableDiffusion 1.5 / 2, SDXL, SD3 / 3.5, FLUX.1 dev / schnell, PixArt-Alpha
/ Sigma, DiT) into
(a) its network call: conditioning.backbone_call dispatches on the network's class (the family's keywords, FLUX's
    packing, learned-sigma channels dropped), so the adapter only names its network;
(b) `denoiser(network)`: DiscreteDenoiser / FlowMatchDenoiser scalings over that call and the family's noise grid
    (alphas_cumprod, or flow matching at the scheduler's shift, dynamic shifting resolved at the sampled size), and
    `sigmas(n)`: the levels the family's stock scheduler samples n steps at;
(c) `encode_prompts(prompts)` / `encode_labels(labels)` -> Conditioning, through the pipeline's own encode_prompt,
    and `null()`, the condition classifier-free guidance contrasts with;
(d) `encode(images)` / `decode(latents)` through the VAE (scaling, shift, latents mean / std);
(e) `export(network, scheduler, path)`: the family's own pipeline class around a student network and a scheduler.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from dstudio.distill.core.conditioning import Conditioning, backbone_call
from dstudio.distill.core.denoiser import DiscreteDenoiser, FlowMatchDenoiser
from dstudio.samplers.schedules import clipping_of


class FamilyBackbone(nn.Module):
    """A network as today's call_backbone sees a class-conditional UNet (no cross_attention_dim: the condition comes
    as `class_labels`), running backbone_call. Not needed once call_backbone hands Conditionings to backbone_call."""

    config = SimpleNamespace()

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor, t: Tensor, class_labels: Conditioning | None = None) -> Tensor:
        return backbone_call(self.network, x, t, class_labels)


# --- (b) noise grids --------------------------------------------------------------------------------------------------

FIXED_GRID_ONLY = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                   "stochastic_sampling")


def dynamic_mu(config, image_seq_len: int) -> float | None:
    """The resolution-dependent shift parameter mu of a FlowMatchEuler config (None without dynamic shifting), as
    FluxPipeline and StableDiffusion3Pipeline compute it from the image's token count."""
    if not config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                           config.max_shift)


def flow_shift(config, image_seq_len: int) -> float:
    """The fixed shift s -> shift s / (1 + (shift - 1) s) a FlowMatchEuler config samples with at this token count:
    `shift`, or with dynamic shifting exp(mu) (exponential time shift: e^mu / (e^mu + 1 / s - 1) is that map) or mu
    (linear time shift)."""
    odd = [k for k in FIXED_GRID_ONLY if config.get(k)]
    if odd:
        raise ValueError(f"FlowMatchEulerDiscreteScheduler sets {odd[0]}: only a fixed or dynamic shift maps to a "
                         f"flow-matching grid")
    mu = dynamic_mu(config, image_seq_len)
    if mu is None:
        return float(config.get("shift", 1.0))
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


def is_flow(scheduler) -> bool:
    from dstudio.samplers.schedules import is_flow_matching

    return is_flow_matching(scheduler.config)


def stock_scheduler(scheduler):
    """The scheduler a family's teacher samples with for reference: its own FlowMatchEuler, or DDIM (trailing) with
    the teacher config's clip_sample, False where it has none (DDIM's pixel-space default would clip latents)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow(scheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing",
                                     clip_sample=bool(scheduler.config.get("clip_sample", False)))


# --- (d) VAE latents --------------------------------------------------------------------------------------------------

def latent_affine(config, device=None) -> tuple[Tensor, Tensor]:
    """(a, b) with VAE latents z = a x + b for model latents x: latents_mean / latents_std where the VAE has them,
    else 1 / scaling_factor and shift_factor (SD3, FLUX; 0 for the others)."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        mean, std = [config.get("shift_factor") or 0.0], [1.0]
    return _per_channel(std, device) / config.scaling_factor, _per_channel(mean, device)


def _per_channel(values, device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


# --- the adapters -----------------------------------------------------------------------------------------------------

FAMILIES: dict[str, type["Family"]] = {}  # pipeline class name -> adapter


def family(*pipeline_classes: str):
    """Register an adapter for these diffusers pipeline classes."""
    def register(cls):
        FAMILIES.update(dict.fromkeys(pipeline_classes, cls))
        return cls
    return register


def family_of(pipeline, height: int | None = None, width: int | None = None) -> "Family":
    """The adapter of a loaded pipeline (sampled at height x width pixels; None: the pipeline's default)."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__](pipeline, height, width)
    raise ValueError(f"{type(pipeline).__name__} is not a pipeline family dstudio knows; known: {', '.join(FAMILIES)}")


@dataclass
class Family:
    """A loaded diffusers pipeline seen by the core. Subclasses say how their pipeline encodes a condition."""

    pipeline: object
    height: int | None = None  # pixels; None: the pipeline's default
    width: int | None = None

    network_name: ClassVar[str] = "transformer"
    packing: ClassVar[int] = 1  # FLUX packs 2x2 latent patches into the channels of one token

    @property
    def network(self) -> nn.Module:
        return getattr(self.pipeline, self.network_name)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def call_default(self, name: str):
        """The default of the pipeline's __call__ argument `name` (max_sequence_length, guidance_scale, ...)."""
        return inspect.signature(type(self.pipeline).__call__).parameters[name].default

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels unless given: the pipeline's default sample size (FLUX's 128, else the
        network's) at the VAE's scale."""
        default = (getattr(self.pipeline, "default_sample_size", None) or self.network.config.sample_size) \
            * self.vae_scale_factor
        return self.height or default, self.width or default

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the Denoiser's state: the latents, unpacked, as the pipeline sizes them."""
        (h, w), f, k = self.size, self.vae_scale_factor, self.packing
        return self.network.config.in_channels // k**2, k * (h // (k * f)), k * (w // (k * f))

    def image_seq_len(self) -> int:
        """The network's image token count at the sampled size (dynamic shifting reads it)."""
        _, h, w = self.sample_shape
        p = (self.network.config.get("patch_size") or 1) * self.packing
        return (h // p) * (w // p)

    # (b) the Denoiser and its grid
    def denoiser(self, network: nn.Module | None = None) -> DiscreteDenoiser:
        """The x0 denoiser of the family's network (or of a student's copy of it) on the teacher's noise grid."""
        model = FamilyBackbone(network if network is not None else self.network)
        scheduler = self.pipeline.scheduler
        if is_flow(scheduler):
            return FlowMatchDenoiser(model, scheduler.config.num_train_timesteps,
                                     flow_shift(scheduler.config, self.image_seq_len()))
        return DiscreteDenoiser(model, scheduler.alphas_cumprod, scheduler.config.prediction_type)

    @property
    def clipping(self) -> dict | None:
        """The scheduler's x0 clipping (clip_sample / thresholding) as ClippedDenoiser kwargs."""
        return None if is_flow(self.pipeline.scheduler) else clipping_of(self.pipeline.scheduler.config)

    def grid(self, n: int) -> dict:
        """How the pipeline asks its scheduler for n steps (set_timesteps keywords, less mu)."""
        return {"num_inference_steps": n}

    def timestep_kwargs(self, n: int) -> dict:
        """What the pipeline passes to its scheduler's set_timesteps for n steps: the grid and, with dynamic
        shifting, mu at the sampled size."""
        mu = dynamic_mu(self.pipeline.scheduler.config, self.image_seq_len())
        return self.grid(n) if mu is None else {**self.grid(n), "mu": mu}

    def sigmas(self, n: int) -> Tensor:
        """The VE noise levels of the stock scheduler's n steps, ending at the level its last step lands on (0, or
        alphabar_0's for DDIM without set_alpha_to_one); flow matching's s = 1 is the grid's largest finite sigma."""
        scheduler, d = stock_scheduler(self.pipeline.scheduler), self.denoiser()
        scheduler.set_timesteps(**self.timestep_kwargs(n))
        if is_flow(scheduler):
            s = scheduler.sigmas.double()
            return (s / (1 - s)).clamp(max=d.sigma_max)
        last = 0.0 if scheduler.config.set_alpha_to_one else d.sigma_min
        return torch.cat([d.t_to_sigma(scheduler.timesteps.double()), torch.tensor([last], dtype=torch.float64)])

    # (c) conditions
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The prompts' condition exactly as the pipeline encodes them."""
        raise TypeError(f"{type(self.pipeline).__name__} takes class labels, not prompts")

    def encode_labels(self, labels) -> Conditioning:
        raise TypeError(f"{type(self.pipeline).__name__} takes prompts, not class labels")

    def null(self) -> Conditioning:
        """The batch-1 condition classifier-free guidance contrasts with: the empty prompt's, as the pipeline's
        negative prompt default."""
        return self.encode_prompts([""])

    # (d) VAE
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> model latents: the VAE posterior means, scaled (and shifted) as the pipeline does."""
        vae = self.pipeline.vae
        a, b = latent_affine(vae.config, vae.device)
        return (vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float() - b) / a

    def decode(self, latents: Tensor) -> Tensor:
        """Model latents -> images in [-1, 1] through the VAE decoder, as the pipeline decodes."""
        vae = self.pipeline.vae
        a, b = latent_affine(vae.config, latents.device)
        return vae.decode((a * latents + b).to(vae.device, vae.dtype)).sample.float()

    # (e) export
    def with_network(self, network: nn.Module, scheduler):
        """The family's own pipeline class around `network` and `scheduler`, the teacher's other components (text
        encoders, tokenizers, VAE) and settings (force_zeros_for_empty_prompt, ...) shared."""
        pipe, components = self.pipeline, self.pipeline.components
        settings = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in components}
        kwargs = {**components, **settings, self.network_name: network, "scheduler": scheduler}
        with warnings.catch_warnings():  # "no safety checker": a tiny or user-provided pipeline may not have one
            warnings.simplefilter("ignore")
            return type(pipe)(**kwargs)

    def export(self, network: nn.Module, scheduler, path: str | Path, **info) -> Path:
        """Write the family's pipeline around a student network (a LoRA view fused; for UNet families its adapter
        also under lora/) and a scheduler (a dstudio one travels in the folder) for plain diffusers."""
        from dstudio.distill.core.export import export_pipeline
        from dstudio.distill.core.lora import AdapterView, fused_unet

        lora = network if isinstance(network, AdapterView) and self.network_name == "unet" else None
        return export_pipeline(self.with_network(fused_unet(network), scheduler), path, lora=lora, **info)


@family("StableDiffusionPipeline")
class StableDiffusion(Family):
    """SD 1.x / 2.x: one CLIP encoder's last hidden states."""

    network_name = "unet"

    def encode_prompts(self, prompts):
        embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return Conditioning(embeds=embeds)


@family("StableDiffusionXLPipeline")
class StableDiffusionXL(Family):
    """SDXL: both CLIP encoders' penultimate states side by side, the second's pooled projection, and the time ids
    (original size, crop top-left, target size) of the sampled size; the null is zeros (force_zeros_for_empty_prompt)
    or the empty prompt's."""

    network_name = "unet"

    def encode_prompts(self, prompts):
        pipe = self.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=False)
        projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                      else int(pooled.shape[-1]))
        time_ids = pipe._get_add_time_ids(self.size, (0, 0), self.size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection)
        return Conditioning(embeds=embeds, pooled=pooled, time_ids=time_ids.to(self.device).repeat(len(prompts), 1))

    def null(self):
        empty = self.encode_prompts([""])
        if not self.pipeline.config.force_zeros_for_empty_prompt:
            return empty
        return dataclasses.replace(empty, embeds=torch.zeros_like(empty.embeds), pooled=torch.zeros_like(empty.pooled))


@family("StableDiffusion3Pipeline")
class StableDiffusion3(Family):
    """SD3 / 3.5: two CLIP encoders' penultimate states padded to T5's width, then T5's (zeros without text_encoder_3),
    and both pooled projections; flow matching at the scheduler's shift."""

    def encode_prompts(self, prompts):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.call_default("max_sequence_length"))
        return Conditioning(embeds=embeds, pooled=pooled)


@family("FluxPipeline")
class Flux(Family):
    """FLUX.1: T5 states and CLIP's pooled output; latents packed in 2x2 patches inside the network call; FLUX.1-dev's
    guidance embedding takes the pipeline's default guidance_scale, schnell has none; its sigmas are
    linspace(1, 1 / n, n), shifted by mu at the sampled size."""

    packing = 2

    def grid(self, n):
        return {"sigmas": np.linspace(1.0, 1 / n, n)}

    def encode_prompts(self, prompts):
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self.device,
                                                        max_sequence_length=self.call_default("max_sequence_length"))
        guidance = (torch.full((len(prompts),), float(self.call_default("guidance_scale")), device=self.device)
                    if self.network.config.guidance_embeds else None)
        return Conditioning(embeds=embeds, pooled=pooled, guidance=guidance)


@family("PixArtSigmaPipeline", "PixArtAlphaPipeline")
class PixArt(Family):
    """PixArt-Sigma / Alpha: T5 states with their attention mask (the pipeline's caption cleaning and sequence
    length); learned sigma; PixArt-Alpha 1024's resolution and aspect ratio as time ids."""

    def encode_prompts(self, prompts):
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device,
            clean_caption=self.call_default("clean_caption"),
            max_sequence_length=self.call_default("max_sequence_length"))
        time_ids = None
        if self.network.use_additional_conditions:
            h, w = self.size
            time_ids = torch.tensor([[h, w, h / w]], dtype=embeds.dtype, device=self.device).repeat(len(prompts), 1)
        return Conditioning(embeds=embeds, mask=mask, time_ids=time_ids)


@family("DiTPipeline")
class DiT(Family):
    """DiT: class labels (prompts: the pipeline's label names), null class num_embeds_ada_norm; learned sigma."""

    def encode_labels(self, labels):
        return Conditioning(labels=torch.as_tensor(labels, device=self.device).reshape(-1))

    def encode_prompts(self, prompts):
        return self.encode_labels(self.pipeline.get_label_ids(list(prompts)))

    def null(self):
        return self.encode_labels([self.network.config.num_embeds_ada_norm])
