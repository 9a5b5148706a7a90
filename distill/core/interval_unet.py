"""A UNet2DModel that also sees the length h = t - r of the step it takes: a two-time (flow-map) model such as
MeanFlow's average velocity u(z, r, t) (Geng et al. 2025), built around a teacher's UNet.

Self-contained (torch and diffusers only): export.ship_class copies it into exported folders as
`unet/interval_unet.py`, named in model_index.json as ["interval_unet", "IntervalUNet2DModel"], so plain diffusers
loads it with `trust_remote_code=True`. A pipeline passes only the sample, the time step and the labels, so h
arrives as one extra input channel, constant over the image, which FlowEulerScheduler(interval_input=True) appends
in `scale_model_input`; `interval=` gives it directly, and without either h = 0 (the instantaneous velocity).
h enters as diffusers' own time embedding does (sinusoids of h * interval_scale, then an MLP) and is added to the
UNet's time embedding; the MLP's last layer starts at zero, so a fresh wrapper is its UNet exactly, at every h.
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d import UNet2DOutput


class IntervalUNet2DModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, unet_config: dict, interval_scale: float = 1000.0, sample_size: int = 16,
                 in_channels: int = 1, num_class_embeds: int | None = None):
        super().__init__()
        self.unet = UNet2DModel.from_config(unet_config)
        width = self.unet.config.block_out_channels[0]
        self.interval_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.interval_embedding = TimestepEmbedding(width, self.unet.time_embedding.linear_2.out_features)
        torch.nn.init.zeros_(self.interval_embedding.linear_2.weight)
        torch.nn.init.zeros_(self.interval_embedding.linear_2.bias)

    @classmethod
    def around(cls, unet: UNet2DModel, interval_scale: float = 1000.0) -> "IntervalUNet2DModel":
        """A wrapper whose UNet is `unet` itself (its weights, trainable as they are)."""
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        out = cls(config, interval_scale, config["sample_size"], config["in_channels"], config.get("num_class_embeds"))
        out.unet = unet
        return out

    def split_interval(self, sample: torch.Tensor, interval) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image channels, h per sample): h given, read from the extra channel, or 0."""
        if interval is None and sample.shape[1] == self.config.in_channels + 1:
            sample, interval = sample[:, :-1], sample[:, -1].flatten(1)[:, 0]
        interval = torch.zeros(()) if interval is None else interval
        return sample, torch.as_tensor(interval, device=sample.device).expand(sample.shape[0])

    def forward(self, sample, timestep, class_labels=None, interval=None, return_dict: bool = True):
        sample, h = self.split_interval(sample, interval)
        proj = self.interval_proj(h * self.config.interval_scale).to(self.dtype)
        extra = self.interval_embedding(proj)
        hook = self.unet.time_embedding.register_forward_hook(lambda module, args, out: out + extra.to(out.dtype))
        try:
            out = self.unet(sample, timestep, class_labels=class_labels).sample
        finally:
            hook.remove()
        return UNet2DOutput(sample=out) if return_dict else (out,)
