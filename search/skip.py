"""Stage two of AutoDiffusion: UNet blocks replaced by identity at chosen sampling steps.

A skipped resnet returns its input (through its 1x1 shortcut where the channel count changes), a skipped
attention returns its input; resnets that up- or down-sample are never skippable, so resolutions are kept.
"""
from __future__ import annotations

import contextlib

from torch import nn


def _kind(module: nn.Module) -> str | None:
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


def skippable_blocks(unet: nn.Module) -> list[str]:
    """Names (as in `named_modules`) of the blocks that can be replaced by identity, in forward order."""
    names = []
    for name, m in unet.named_modules():
        kind = _kind(m)
        if kind and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def _identity_forward(module: nn.Module, kind: str):
    if kind == "resnet":
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
def skipping(unet: nn.Module, names):
    """Within the block, the named blocks of `unet` compute nothing and pass their input on."""
    modules = dict(unet.named_modules())
    unknown = [n for n in names if n not in modules or _kind(modules[n]) is None]
    if unknown:
        raise ValueError(f"block '{unknown[0]}' is not a skippable block of this UNet; "
                         f"skippable: {', '.join(skippable_blocks(unet))}")
    patched = []
    try:
        for n in names:
            m = modules[n]
            m.forward = _identity_forward(m, _kind(m))
            patched.append(m)
        yield unet
    finally:
        for m in patched:
            del m.forward  # back to the class's forward


class SkippingDenoiser(nn.Module):
    """A denoiser whose i-th call (i-th sampling step) runs with `skips[i]` replaced by identity."""

    def __init__(self, denoiser, unet: nn.Module, skips):
        super().__init__()
        self.denoiser, self.unet, self.skips = denoiser, unet, list(skips)
        self.calls = 0

    def forward(self, x, sigma, cond=None):
        names = self.skips[self.calls] if self.calls < len(self.skips) else ()
        self.calls += 1
        with skipping(self.unet, names):
            return self.denoiser(x, sigma, cond)
