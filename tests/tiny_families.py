"""Tiny randomly initialised pipelines of the families diffusers users distil, built from configs (no download) and
saved by each family's own pipeline class: sd15, sdxl, sd3, flux-schnell, flux-dev, pixart_sigma, dit.

Shapes: 16x16 images, 8x8 latents (a VAE of two blocks, scale factor 2), hidden sizes 16-32, one or two layers,
CLIP tokenizers over tiny_sd's vocabulary and T5 tokenizers over the same words (a tokenizers Unigram model).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_sd import WORDS, tiny_sd_pipeline, write_tokenizer

SIZE = 16  # pixels; latents are SIZE // 2
T5_DIM = 32  # the T5 encoders' d_model: SD3's joint_attention_dim, FLUX's and PixArt's caption width


def clip_tokenizer(folder: Path):
    """tiny_sd's CLIP BPE tokenizer (model_max_length 8)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tokenizer(folder))


def clip_encoder(tokenizer, with_projection: bool = False, hidden_size: int = 16, projection_dim: int = 16):
    """A two-layer CLIP text encoder whose pooled output reads the end-of-text token of tiny_sd's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8,
                            projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_tokenizer():
    """A T5 tokenizer over WORDS: a tokenizers Unigram model with T5's pad / eos / unk ids 0 / 1 / 2 and its "</s>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=32)


def t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def vae(latent_channels: int = 4, **config):
    """A two-block AutoencoderKL (scale factor 2); SD3 / FLUX pass their scaling and shift factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=SIZE, **config)


def sdxl(tmp: Path):
    """Two CLIP encoders (the second with projection: the pooled text_embeds) and a text_time UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(tmp / "tok"), clip_tokenizer(tmp / "tok2")
    text_encoder, text_encoder_2 = clip_encoder(tokenizer), clip_encoder(tokenizer_2, with_projection=True)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)


def sd3(tmp: Path):
    """Two CLIP encoders with projection (pooled: both concatenated), T5, and a flow-matching MMDiT at shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(tmp / "tok"), clip_tokenizer(tmp / "tok2"), t5_tokenizer()
    text_encoder = clip_encoder(tokenizer, with_projection=True)
    text_encoder_2 = clip_encoder(tokenizer_2, with_projection=True)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=T5_DIM,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=SIZE)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=t5_encoder(tokenizer_3),
        tokenizer_3=tokenizer_3)


def flux(tmp: Path, guidance_embeds: bool):
    """CLIP (pooled) + T5, packed 2x2 latents; dev-like: the guidance embedding and dynamic shifting; schnell-like:
    neither (shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(tmp / "tok"), t5_tokenizer()
    text_encoder = clip_encoder(tokenizer)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return FluxPipeline(scheduler=scheduler, vae=vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                                     use_post_quant_conv=False),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=t5_encoder(tokenizer_2),
                        tokenizer_2=tokenizer_2, transformer=transformer)


def pixart_sigma(tmp: Path):
    """T5 with its attention mask and a learned-sigma PixArt transformer (out_channels = 2 x in_channels)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=SIZE // 2, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=T5_DIM, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer), vae=vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def dit(tmp: Path):
    """A class-conditional learned-sigma DiT over 1,000 labels (DiTPipeline's null class is 1000)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        sample_size=SIZE // 2, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, norm_num_groups=8, num_embeds_ada_norm=1000)
    return DiTPipeline(transformer=transformer, vae=vae(), scheduler=DDIMScheduler(clip_sample=False))


BUILDERS = {
    "sd15": tiny_sd_pipeline,
    "sdxl": sdxl,
    "sd3": sd3,
    "flux-schnell": lambda tmp: flux(tmp, guidance_embeds=False),
    "flux-dev": lambda tmp: flux(tmp, guidance_embeds=True),
    "pixart_sigma": pixart_sigma,
    "dit": dit,
}
FAMILIES = tuple(BUILDERS)

# What each pipeline's __call__ needs on top of its prompts (or labels) to draw 16x16 images from these folders:
# FluxPipeline's default size is 128 latents whatever the VAE, and PixArt bins sizes only at its four real ones.
CALL_KWARGS = {"flux-schnell": dict(height=SIZE, width=SIZE), "flux-dev": dict(height=SIZE, width=SIZE),
               "pixart_sigma": dict(use_resolution_binning=False)}


def tiny_pipeline(family: str, tmp_path: Path):
    """(pipeline, folder): a tiny `family` pipeline (seeded, in eval mode as from_pretrained leaves it: T5's dropout
    and DiT's label dropout are off), saved by its own class's save_pretrained."""
    torch.manual_seed(0)
    pipe = BUILDERS[family](tmp_path)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    folder = Path(tmp_path) / family
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder
