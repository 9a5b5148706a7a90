"""The family adapter base: a loaded diffusers pipeline seen by the core as a network call, a Conditioning, a noise
grid, a VAE, a feature tap and an export (the adapters of each family are in families.py).

A family adapter turns a pipeline into
(a) its network call: conditioning.backbone_call dispatches on the network's class (the family's keywords, FLUX's
    packing, learned-sigma channels dropped), so the adapter only names its network;
(b) `denoiser(network)`: DiscreteDenoiser / FlowMatchDenoiser scalings over that call and the family's noise grid
    (alphas_cumprod, or flow matching at the scheduler's shift, dynamic shifting resolved at the sampled size), and
    `sigmas(n)`: the levels the family's stock scheduler samples n steps at;
(c) `encode_prompts(prompts)` / `encode_labels(labels)` -> Conditioning, through the pipeline's own encode_prompt,
    and `null()`, the condition classifier-free guidance contrasts with;
(d) `encode(images)` / `decode(latents)` through the VAE (scaling, shift, latents mean / std);
(e) `export(network, scheduler, path)`: the family's own pipeline class around a student network and a scheduler;
(f) `feature_tap()`: where DMD2's GAN head reads features (a UNet's mid-block, a transformer's middle block).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from dstudio.distill.core.conditioning import Conditioning
from dstudio.distill.core.denoiser import DiscreteDenoiser, FlowMatchDenoiser
from dstudio.samplers.schedules import PREDICTION_TYPES, clipping_of, is_flow_matching

# --- (b) noise grids --------------------------------------------------------------------------------------------------

FIXED_GRID_ONLY = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                   "stochastic_sampling")


def dynamic_mu(config, image_seq_len: int) -> float | None:
    """The resolution-dependent shift parameter mu of a FlowMatchEuler config (None without dynamic shifting), as
    FluxPipeline and StableDiffusion3Pipeline compute it from the image's token count."""
    if not config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


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
    return is_flow_matching(scheduler.config)


def stock_scheduler(scheduler):
    """The scheduler a family's teacher samples with for reference (the one owner: evaluation, the benchmarks, the
    tests): its own FlowMatchEuler, or DDIM (trailing) with the teacher config's clip / threshold settings, no
    clip_sample where it has none (DDIM's pixel-space default would clip latents)."""
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


# --- (f) the GAN head's features --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureTap:
    """Where a network's bottleneck features are read (DMD2's GAN head): the module at `path`, its output (element
    `index` of a tuple) a (B, C, H, W) map, or tokens (B, N, C) of an h x w `grid`, returned as a map."""

    path: str
    channels: int
    grid: tuple[int, int] | None = None
    index: int = 0

    def as_map(self, out) -> Tensor:
        out = out[self.index] if isinstance(out, tuple) else out
        if self.grid is None:
            return out
        return out.transpose(1, 2).reshape(len(out), out.shape[-1], *self.grid)

    @contextlib.contextmanager
    def capture(self, network: nn.Module):
        """The features of `network`'s calls made inside the block (a list; the hook goes when the block ends); a
        LoRA view is tapped on its backbone."""
        outputs: list[Tensor] = []
        module = getattr(network, "base", network).get_submodule(self.path)
        handle = module.register_forward_hook(lambda m, args, out: outputs.append(self.as_map(out)))
        try:
            yield outputs
        finally:
            handle.remove()


# --- the adapter base -------------------------------------------------------------------------------------------------

FAMILIES: dict[str, type["Family"]] = {}  # pipeline class name -> adapter


def family(*pipeline_classes: str):
    """Register an adapter for these diffusers pipeline classes."""
    def register(cls):
        FAMILIES.update(dict.fromkeys(pipeline_classes, cls))
        return cls
    return register


def family_of(pipeline, height: int | None = None, width: int | None = None) -> "Family":
    """The adapter of a loaded pipeline (sampled at height x width pixels; None: the pipeline's default)."""
    import dstudio.distill.core.families  # noqa: F401  (the adapters register themselves)

    for cls in type(pipeline).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__](pipeline, height, width)
    raise ValueError(f"{type(pipeline).__name__} is not a pipeline family dstudio knows; known: {', '.join(FAMILIES)}")


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class Family:
    """A loaded diffusers pipeline seen by the core. Subclasses say how their pipeline encodes a condition."""

    pipeline: object
    height: int | None = None  # pixels; None: the pipeline's default
    width: int | None = None

    network_name: ClassVar[str] = "transformer"
    packing: ClassVar[int] = 1  # FLUX packs 2x2 latent patches into the channels of one token
    takes_prompts: ClassVar[bool] = True  # conditioned on prompts (else on class labels, or on nothing)
    pixel_space: ClassVar[bool] = False  # a model of pixels (no VAE): the embedded protocol's teachers

    @property
    def network(self) -> nn.Module:
        return getattr(self.pipeline, self.network_name)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def num_classes(self) -> int:
        """The class labels it takes (0: prompts, or unconditional)."""
        return 0

    def call_default(self, name: str):
        """The default of the pipeline's __call__ argument `name` (max_sequence_length, guidance_scale, ...)."""
        return inspect.signature(type(self.pipeline).__call__).parameters[name].default

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        """The pipeline's default sample size in pixels: the network's sample size at the VAE's scale."""
        h, w = _pair(getattr(self.pipeline, "default_sample_size", None) or self.network.config.sample_size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels: as given, else the pipeline's default."""
        h, w = self.default_size()
        return self.height or h, self.width or w

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the Denoiser's state: the latents, unpacked, as the pipeline sizes them."""
        (h, w), f, k = self.size, self.vae_scale_factor, self.packing
        return self.network.config.in_channels // k**2, k * (h // (k * f)), k * (w // (k * f))

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it draws."""
        return (self.pipeline.vae.config.out_channels, *self.size)

    def image_seq_len(self) -> int:
        """The network's image token count at the sampled size (dynamic shifting reads it)."""
        _, h, w = self.sample_shape
        p = (self.network.config.get("patch_size") or 1) * self.packing
        return (h // p) * (w // p)

    # (b) the Denoiser and its grid
    def denoiser(self, network: nn.Module | None = None) -> DiscreteDenoiser:
        """The x0 denoiser of the family's network (or of a student's copy of it) on the teacher's noise grid."""
        model = network if network is not None else self.network
        scheduler = self.pipeline.scheduler
        if is_flow(scheduler):
            return FlowMatchDenoiser(model, scheduler.config.num_train_timesteps,
                                     flow_shift(scheduler.config, self.image_seq_len()))
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES or getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"scheduler {type(scheduler).__name__} (prediction_type '{prediction_type}') is not a "
                             f"DDPM-family scheduler of {', '.join(PREDICTION_TYPES)} or flow matching")
        return DiscreteDenoiser(model, scheduler.alphas_cumprod, prediction_type)

    @property
    def clipping(self) -> dict | None:
        """The scheduler's x0 clipping (clip_sample / thresholding) as ClippedDenoiser kwargs."""
        return None if is_flow(self.pipeline.scheduler) else clipping_of(self.pipeline.scheduler.config)

    def fixed_scheduler(self):
        """The pipeline's scheduler at the sampled size: dynamic shifting resolved to its fixed shift exp(mu) (what
        students' schedulers copy), else the scheduler itself."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = self.pipeline.scheduler
        if not (is_flow(scheduler) and scheduler.config.get("use_dynamic_shifting")):
            return scheduler
        return FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config, shift=flow_shift(scheduler.config, self.image_seq_len()), use_dynamic_shifting=False)

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

    def null(self) -> Conditioning | None:
        """The batch-1 condition classifier-free guidance contrasts with (None: an unconditional model): the empty
        prompt's, as the pipeline's negative prompt default."""
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

    # (e) drawing with the pipeline itself, and export
    def call_inputs(self, n: int, prompts: list[str] | None = None, labels=None, guidance: float = 1.0) -> dict:
        """The pipeline's __call__ keywords (plain data) for n images of these prompts (or labels) at the sampled size
        with classifier-free guidance w."""
        h, w = self.size
        return {"prompt": list(prompts), "height": h, "width": w, "guidance_scale": guidance}

    def draw(self, n: int, steps: int | None = None, guidance: float = 1.0, generator=None, **condition) -> Tensor:
        """n images in [0, 1] (B, C, H, W) from the pipeline's own __call__ (with whatever scheduler it holds), for
        `prompts=` or `labels=`."""
        steps = steps or getattr(self.pipeline.scheduler, "default_num_inference_steps", None)
        kwargs = {"num_inference_steps": steps} if steps else {}
        images = self.pipeline(**self.call_inputs(n, guidance=guidance, **condition), generator=generator,
                               output_type="pt", **kwargs).images
        return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) if not torch.is_tensor(images) else images

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

    # (f) features
    def feature_tap(self) -> FeatureTap:
        """A transformer's middle block: its image tokens on the latent grid of its patches."""
        return self._block_tap(len(self.network.transformer_blocks) // 2)

    def feature_taps(self) -> list[FeatureTap]:
        """Taps along the network (the teacher-feature perceptual distance): about four evenly spaced blocks."""
        n = len(self.network.transformer_blocks)
        return [self._block_tap(i) for i in range(0, n, max(1, n // 4))]

    def _block_tap(self, i: int) -> FeatureTap:
        """Transformer block i's image tokens (the last element of a joint block's output) on its patch grid."""
        cfg = self.network.config
        _, h, w = self.sample_shape
        p = (cfg.get("patch_size") or 1) * self.packing
        return FeatureTap(f"transformer_blocks.{i}", cfg.num_attention_heads * cfg.attention_head_dim,
                          (h // p, w // p), index=-1)
