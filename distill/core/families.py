"""Teachers by family: the adapters of the pipeline families dstudio distils (the base, its noise grids, VAE
scaling and feature taps are in family.py): DDPM-style pixel UNets (dstudio's own pipeline, DDPMPipeline), Stable
Diffusion 1.5 / 2, SDXL, SD3 / 3.5, FLUX.1 dev / schnell, PixArt-Alpha / Sigma and DiT. Each says how its pipeline
encodes a condition, what its null condition is, and where its sizes, features and exports differ from the base.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dstudio.distill.core.conditioning import Conditioning
from dstudio.distill.core.family import (FAMILIES, Family, FeatureTap, dynamic_mu, family, family_of,  # noqa: F401
                                         flow_shift, is_flow, latent_affine, stock_scheduler)


def label_condition(labels, device) -> Conditioning:
    """Class labels (a list or tensor) as a condition."""
    return Conditioning(labels=torch.as_tensor(labels, device=device).reshape(-1))


class UNetFamily(Family):
    """A UNet family: the GAN head reads its mid-block."""

    network_name = "unet"

    def feature_tap(self):
        return FeatureTap("mid_block", self.network.config.block_out_channels[-1])

    def feature_taps(self) -> list[FeatureTap]:
        """Each down block's output (its hidden states) and the mid-block's."""
        down = [FeatureTap(f"down_blocks.{i}", c) for i, c in enumerate(self.network.config.block_out_channels)]
        return down + ([self.feature_tap()] if self.network.mid_block is not None else [])


@family("DStudioPipeline", "DDPMPipeline")
class PixelUNet(UNetFamily):
    """A DDPM-style UNet2DModel in pixel space (dstudio's own pipeline class; a DDPMPipeline): class labels with the
    null label after the classes (unconditional: no condition, no null), no VAE."""

    takes_prompts = False
    pixel_space = True
    vae_scale_factor = 1

    @property
    def num_classes(self) -> int:
        from dstudio.distill.core.pipeline_dstudio import classes_of

        return classes_of(self.network.config.get("num_class_embeds"))

    def default_size(self):
        size = self.network.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def pixel_shape(self):
        return self.sample_shape

    def encode_labels(self, labels):
        return label_condition(labels, self.device)

    def null(self):
        return self.encode_labels([self.num_classes]) if self.num_classes else None

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents

    def call_inputs(self, n, prompts=None, labels=None, guidance=1.0):
        labels = None if labels is None else torch.as_tensor(labels).tolist()
        return {"batch_size": n, "class_labels": labels, "guidance_scale": guidance}

    def with_network(self, network, scheduler):
        from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

        return DStudioPipeline(unet=network, scheduler=scheduler)

    def export(self, network, scheduler, path, **info):
        from dstudio.distill.core.export import export_image_pipeline

        return export_image_pipeline(network, scheduler, path, **info)


@family("StableDiffusionPipeline")
class StableDiffusion(UNetFamily):
    """SD 1.x / 2.x: one CLIP encoder's last hidden states."""

    def encode_prompts(self, prompts):
        embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return Conditioning(embeds=embeds)


@family("StableDiffusionXLPipeline")
class StableDiffusionXL(UNetFamily):
    """SDXL: both CLIP encoders' penultimate states side by side, the second's pooled projection, and the time ids
    (original size, crop top-left, target size) of the sampled size; the null is zeros (force_zeros_for_empty_prompt)
    or the empty prompt's."""

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

    def default_size(self):
        """The VAE's sample size (1024 on FLUX.1, the pipeline's own default there); FluxPipeline's 128 latents
        whatever the VAE would make a small pipeline's default far larger than its VAE."""
        size = self.pipeline.vae.config.get("sample_size")
        return (size, size) if isinstance(size, int) else tuple(size) if size else super().default_size()

    def call_inputs(self, n, prompts=None, labels=None, guidance=1.0):
        """FluxPipeline's guidance_scale is the distilled guidance embedding; classifier-free guidance is its true
        CFG against the empty negative prompt."""
        h, w = self.size
        cfg = {} if guidance == 1 else {"true_cfg_scale": guidance, "negative_prompt": [""] * n}
        return {"prompt": list(prompts), "height": h, "width": w, **cfg}

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

    def call_inputs(self, n, prompts=None, labels=None, guidance=1.0):
        """Resolution binning off: it raises for sizes other than its four real ones, and is the identity on their
        default square sizes."""
        return {**super().call_inputs(n, prompts, labels, guidance), "use_resolution_binning": False}


@family("DiTPipeline")
class DiT(Family):
    """DiT: class labels (prompts: the pipeline's label names), null class num_embeds_ada_norm; learned sigma."""

    takes_prompts = False

    @property
    def num_classes(self):
        return self.network.config.num_embeds_ada_norm

    def encode_labels(self, labels):
        return label_condition(labels, self.device)

    def call_inputs(self, n, prompts=None, labels=None, guidance=1.0):
        """DiTPipeline draws its noise from the generator at the network's size (no latents, height or width)."""
        return {"class_labels": torch.as_tensor(labels).tolist(), "guidance_scale": guidance}

    def encode_prompts(self, prompts):
        return self.encode_labels(self.pipeline.get_label_ids(list(prompts)))

    def null(self):
        return self.encode_labels([self.network.config.num_embeds_ada_norm])
