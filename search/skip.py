"""Stage two of AutoDiffusion: UNet blocks replaced by identity at chosen sampling steps.

A skipped resnet returns its input (through its 1x1 shortcut where the channel count changes), a skipped
attention returns its input; resnets that up- or down-sample are never skippable, so resolutions are kept.
"""
from __future__ import annotations

import torch
from torch import nn

# the primitives live in the pipeline file every exported folder ships, so an exported stage-two pipeline skips
# exactly as the search did
from dstudio.distill.core.pipeline_dstudio import skip_kind, skipping_blocks


def skippable_blocks(unet: nn.Module) -> list[str]:
    """Names (as in `named_modules`) of the blocks that can be replaced by identity, in forward order."""
    names = []
    for name, m in unet.named_modules():
        if skip_kind(m) and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def skipping(unet: nn.Module, names):
    """Within the block, the named blocks of `unet` compute nothing and pass their input on."""
    modules = dict(unet.named_modules())
    unknown = [n for n in names if n not in modules or skip_kind(modules[n]) is None]
    if unknown:
        raise ValueError(f"block '{unknown[0]}' is not a skippable block of this UNet; "
                         f"skippable: {', '.join(skippable_blocks(unet))}")
    return skipping_blocks(unet, names)


def skip_at(sigma, sigmas, skips, rtol: float = 1e-4) -> frozenset[str]:
    """The skip set of the step whose noise level is `sigma` (relative match, so float32 round trips still match);
    no match, e.g. a sampler's extra evaluation at another level, skips nothing."""
    s = float(torch.as_tensor(sigma).reshape(-1)[0])
    for level, names in zip(sigmas, skips):
        if abs(s - float(level)) <= rtol * abs(float(level)):
            return frozenset(names)
    return frozenset()


class SkippingDenoiser(nn.Module):
    """A denoiser that, called at the i-th noise level `sigmas[i]`, runs with `skips[i]` replaced by identity.

    The skip set is a function of sigma, not of how often it was called, so one instance serves any number of
    batches and any sampler."""

    def __init__(self, denoiser, unet: nn.Module, sigmas, skips):
        super().__init__()
        if len(skips) != len(sigmas):
            raise ValueError(f"{len(skips)} skip sets for {len(sigmas)} noise levels")
        self.denoiser, self.unet = denoiser, unet
        self.sigmas, self.skips = [float(s) for s in sigmas], [frozenset(s) for s in skips]

    def forward(self, x, sigma, cond=None):
        with skipping(self.unet, skip_at(sigma, self.sigmas, self.skips)):
            return self.denoiser(x, sigma, cond)
