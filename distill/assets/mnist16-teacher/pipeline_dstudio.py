"""The pipeline class written next to every image-space model dstudio exports.

Self-contained on purpose (torch and diffusers only): export.ship_class copies the file into each exported folder
and names it in model_index.json as ["pipeline_dstudio", "DStudioPipeline"], so that plain
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads and runs the folder without dstudio.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def class_embeddings(num_classes: int) -> int | None:
    """The class embeddings of a dstudio class-conditional UNet: one per class, plus the null label (classifier-free
    guidance, unconditional sampling), which is the last one, index `num_classes`; None for an unconditional UNet."""
    return num_classes + 1 if num_classes else None


def classes_of(num_class_embeds: int | None) -> int:
    """The classes of a UNet with `num_class_embeds` class embeddings (the null label, the last, is none of them)."""
    return num_class_embeds - 1 if num_class_embeds else 0


def skip_kind(module) -> str | None:
    """AutoDiffusion's skippable blocks: resnets that keep the resolution, transformers, residual attention."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(module, ResnetBlock2D):
        return None if (module.up or module.down) else "resnet"
    if isinstance(module, Transformer2DModel):
        return "transformer"
    if isinstance(module, Attention) and getattr(module, "residual_connection", False):
        return "attention"
    return None


def _identity_forward(module, kind: str):
    if kind == "resnet":  # its input, through the 1x1 shortcut where the channel count changes
        def forward(input_tensor, *args, **kwargs):
            x = module.conv_shortcut(input_tensor) if module.conv_shortcut is not None else input_tensor
            return x / module.output_scale_factor
    elif kind == "transformer":
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        def forward(hidden_states, *args, return_dict: bool = True, **kwargs):
            return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)
    else:
        def forward(hidden_states, *args, **kwargs):
            return hidden_states
    return forward


@contextlib.contextmanager
def skipping_blocks(unet, names):
    """Within the block, the named blocks of `unet` compute nothing and pass their input on."""
    modules = dict(unet.named_modules())
    unknown = [n for n in names if n not in modules or skip_kind(modules[n]) is None]
    if unknown:
        raise ValueError(f"block '{unknown[0]}' is not a skippable block of this UNet")
    patched = []
    try:
        for n in names:
            modules[n].forward = _identity_forward(modules[n], skip_kind(modules[n]))
            patched.append(modules[n])
        yield unet
    finally:
        for m in patched:
            del m.forward  # back to the class's forward


class DStudioPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) image sampling with any diffusers scheduler.

    `class_labels` picks the digit/class per image; the UNet's last class embedding is the null label
    used for classifier-free guidance (`guidance_scale` > 1) and for unconditional sampling.
    `skips` (optional, stored in model_index.json): {"<timestep>": [block names]}, the UNet blocks replaced by
    identity at that time step (AutoDiffusion's stage two).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, skips: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(skips=skips)

    def _skips_at(self, t) -> list[str]:
        skips = self.config.get("skips") or {}
        return skips.get(str(int(round(float(t))))) or []

    @property
    def num_classes(self) -> int:
        return classes_of(self.unet.config.num_class_embeds)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int | None = None,
                 guidance_scale: float = 1.0, generator=None, latents=None, output_type: str = "pil",
                 return_dict: bool = True):
        device, dtype = self._execution_device, self.unet.dtype
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            batch_size = len(class_labels)
            bad = class_labels[(class_labels < 0) | (class_labels >= max(self.num_classes, 1))]
            if len(bad):
                raise ValueError(f"class label {int(bad[0])} is outside this model's classes 0..{self.num_classes - 1}")
        elif self.num_classes:
            class_labels = torch.full((batch_size,), self.num_classes, device=device)
        null = None if class_labels is None else torch.full_like(class_labels, self.num_classes)  # the null label
        cfg = guidance_scale != 1.0 and class_labels is not None

        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None else latents.to(device, dtype)
        # dstudio's schedulers carry their own step list; stock ones get diffusers' usual 50.
        num_inference_steps = num_inference_steps or getattr(self.scheduler, "default_num_inference_steps", 50)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * (getattr(self.scheduler, "init_noise_sigma", None) or 1.0)  # flow matching: None, starts at x = noise
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
            with skipping_blocks(self.unet, self._skips_at(t)):
                if cfg:
                    out = self.unet(torch.cat([x_in, x_in]), t, class_labels=torch.cat([class_labels, null])).sample
                    out_c, out_u = out.chunk(2)
                    out = out_u + guidance_scale * (out_c - out_u)
                else:
                    out = self.unet(x_in, t, class_labels=class_labels).sample
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample

        image = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
