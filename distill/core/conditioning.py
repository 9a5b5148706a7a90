"""The condition of a batch and the network calls that take it: one Conditioning type for every family.

A `Conditioning` holds what any family's network is conditioned on (class labels, or prompt embeddings with their
pooled vectors, masks, micro-conditioning time ids and a distilled guidance scale), batch-first, with the algebra
classifier-free guidance and the methods need (index, expand, cat, to). `backbone_call(model, x, t, cond)` calls a
diffusers network with its own keywords on the Denoiser's (B, C, H, W) state, dispatching on the network's class, so
the teacher's network, a student copy of it and a LoRA view of it are called the same way; a learned-sigma output
keeps its prediction half. Depends on torch (and diffusers, lazily) only, so that denoiser.call_backbone can
delegate to it (docs/families.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Conditioning:
    """One batch's condition, every field batch-first and optional: prompt embeddings `embeds` (B, L, D) with their
    `mask` (B, L) and `pooled` vectors (B, D'), micro-conditioning `time_ids` (B, k: SDXL's sizes and crop, PixArt-
    Alpha's resolution and aspect ratio), class `labels` (B,), and the distilled `guidance` scale (B,) of FLUX.1-dev."""

    embeds: Tensor | None = None
    pooled: Tensor | None = None
    mask: Tensor | None = None
    time_ids: Tensor | None = None
    labels: Tensor | None = None
    guidance: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set, by name."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Conditioning":
        """`fn` applied to every set field."""
        return Conditioning(**{name: fn(v) for name, v in self.tensors().items()})

    def __len__(self) -> int:
        return next((len(v) for v in self.tensors().values()), 0)

    def index(self, idx) -> "Conditioning":
        """The rows `idx` of every field (a table of conditions indexed by a batch's label ids)."""
        return self.map(lambda v: v[idx.to(v.device) if isinstance(idx, Tensor) else idx])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        """On `device`, floating fields in `dtype` (masks and labels keep theirs)."""
        return self.map(lambda v: v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype))

    def expand(self, n: int) -> "Conditioning":
        """A batch-1 condition (the null one) as n rows, without copies."""
        return self.map(lambda v: v.expand(n, *v.shape[1:]))

    @staticmethod
    def cat(conds: list["Conditioning"]) -> "Conditioning":
        """Field-wise torch.cat of conditions with the same fields (CFG's [cond, null] batch)."""
        names = [tuple(c.tensors()) for c in conds]
        if len(set(names)) != 1:
            raise ValueError(f"cannot concatenate conditions with different fields: {sorted(set(names))}")
        return Conditioning(**{name: torch.cat([getattr(c, name) for c in conds]) for name in names[0]})


# --- network calls: one per backbone class, on the Denoiser's (B, C, H, W) state --------------------------------------

def _sample(out) -> Tensor:
    return out.sample if hasattr(out, "sample") else out


def unet2d_call(model, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """A DDPM-style UNet2DModel: class labels (None: unconditional)."""
    return _sample(model(x, t, class_labels=cond.labels))


def unet_call(model, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """A UNet2DConditionModel: prompt embeddings; SDXL's text_time embedding takes the pooled vectors and time ids."""
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if cond.pooled is not None else None
    return _sample(model(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added))


def sd3_call(model, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """SD3's MMDiT: joint CLIP + T5 embeddings and the pooled CLIP vectors (timestep = s T)."""
    return _sample(model(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                         pooled_projections=cond.pooled))


def flux_call(model, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """FLUX.1: 2x2 patches packed into tokens with their (0, row, column) ids, text ids 0, timestep s (= t / 1000 as
    FluxPipeline passes it) and, for guidance-distilled models, the guidance scale."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    if model.config.guidance_embeds and cond.guidance is None:
        raise ValueError("a guidance-distilled FLUX transformer needs the condition's guidance scale")
    out = model(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=t / 1000,
                guidance=cond.guidance if model.config.guidance_embeds else None,
                pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                txt_ids=x.new_zeros(cond.embeds.shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype))
    return FluxPipeline._unpack_latents(_sample(out), h, w, vae_scale_factor=1)


def pixart_call(model, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """PixArt-Alpha / Sigma: T5 embeddings with their attention mask; PixArt-Alpha 1024's resolution and aspect ratio
    travel as time ids (h, w, h / w)."""
    ids = cond.time_ids
    added = ({"resolution": None, "aspect_ratio": None} if ids is None
             else {"resolution": ids[:, :2], "aspect_ratio": ids[:, 2:]})
    return _sample(model(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                         added_cond_kwargs=added))


def dit_call(model, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """DiT: class labels (the null class is num_embeds_ada_norm)."""
    return _sample(model(x, timestep=t, class_labels=cond.labels))


def generic_call(model, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """Any other network with a UNet2DModel's signature (a test's toy module): (x, t), and the labels as
    class_labels when there are any."""
    return _sample(model(x, t) if cond.labels is None else model(x, t, class_labels=cond.labels))


NETWORK_CALLS = {"UNet2DModel": unet2d_call, "RoutedUNet2DModel": unet2d_call, "UNet2DConditionModel": unet_call,
                 "SD3Transformer2DModel": sd3_call, "FluxTransformer2DModel": flux_call,
                 "PixArtTransformer2DModel": pixart_call, "DiTTransformer2DModel": dit_call}


def network_call(model) -> Callable:
    """The call of `model`'s class (or the first of its bases that has one; a LoRA AdapterView: its backbone's);
    generic_call for a network no family names."""
    for cls in type(getattr(model, "base", model)).__mro__:
        if cls.__name__ in NETWORK_CALLS:
            return NETWORK_CALLS[cls.__name__]
    return generic_call


def backbone_call(model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | Tensor | None) -> Tensor:
    """The network's own call in its dtype, for a Conditioning (or bare class labels, None: no condition); of a
    learned-sigma output (Nichol & Dhariwal 2021, sec. 3.1: out_channels = 2 in_channels) the first half, the
    prediction, is kept."""
    dtype = next(model.parameters()).dtype
    cond = (cond if isinstance(cond, Conditioning) else Conditioning(labels=cond)).to(x.device, dtype)
    out = network_call(model)(model, x.to(dtype), t, cond)
    return (out[:, :x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out).to(x.dtype)


class ConditionTable(nn.Module):
    """A table of conditions (one row per class label or prompt) held as buffers, so that it moves with the method
    holding it; a batch's ids look its rows up (no table: the empty condition of an unconditional teacher)."""

    def __init__(self, table: Conditioning):
        super().__init__()
        self.names = tuple(table.tensors())
        for name, value in table.tensors().items():
            self.register_buffer(name, value, persistent=False)

    @property
    def table(self) -> Conditioning:
        return Conditioning(**{name: getattr(self, name) for name in self.names})

    @property
    def rows(self) -> int:
        return len(self.table)

    def forward(self, ids: Tensor | None) -> Conditioning:
        return Conditioning() if ids is None or not self.names else self.table.index(ids)
