"""K class-conditional networks (UNet2DModels, or DiT transformers) behind one network interface, each label routed
to the student that owns it (MSD).

Self-contained (torch and diffusers only): export.ship_class copies it into exported folders as
`unet/routed_unet.py`, named in model_index.json as ["routed_unet", "RoutedUNet2DModel"], so plain diffusers
loads it with `trust_remote_code=True`. Labels no student owns, the null label (classifier-free guidance, see
pipeline_dstudio.class_embeddings) among them, go to student 0.
"""
from __future__ import annotations

import torch
import diffusers
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput


def routed(owner: torch.Tensor, k: int, fn) -> torch.Tensor:
    """fn(j, idx) for each j < k on the batch entries `owner` gives it, reassembled in batch order."""
    parts, order = [], []
    for j in range(k):
        idx = (owner == j).nonzero().squeeze(1)
        if len(idx):
            parts.append(fn(j, idx))
            order.append(idx)
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


class RoutedUNet2DModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, partition: list[list[int]], student_configs: list[dict], sample_size: int = 16,
                 in_channels: int = 1, num_class_embeds: int | None = None, out_channels: int | None = None,
                 student_class: str = "UNet2DModel"):
        super().__init__()
        if student_class not in ("UNet2DModel", "DiTTransformer2DModel"):
            raise ValueError(f"student_class '{student_class}' is not UNet2DModel or DiTTransformer2DModel")
        cls = getattr(diffusers, student_class)
        self.students = torch.nn.ModuleList(cls.from_config(c) for c in student_configs)
        route = torch.zeros(max(num_class_embeds or 0, 1 + max(max(p) for p in partition)), dtype=torch.long)
        for k, classes in enumerate(partition):
            route[list(classes)] = k
        self.register_buffer("route", route, persistent=False)

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        if class_labels is None:
            raise ValueError("RoutedUNet2DModel routes by class label: give class_labels")
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(len(sample))
        owner = self.route.to(sample.device)[class_labels]
        out = routed(owner, len(self.students), lambda k, idx: self.students[k](
            sample[idx], timestep[idx], class_labels=class_labels[idx]).sample.to(sample.dtype))
        return UNet2DOutput(sample=out) if return_dict else (out,)
