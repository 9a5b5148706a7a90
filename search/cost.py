"""The compute a skipped block saves, as a share of one full UNet forward (1.0 = one NFE), counted in
multiply-accumulates (MACs) of one traced forward: convolutions, linear layers and attention's two products.
Norms, activations and embeddings are left out (elementwise, a small share at any size)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs per sample of a Conv2d (each output value: in/groups x kernel products) or a Linear (in_features)."""
    per_out = module.in_features if isinstance(module, nn.Linear) else \
        (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    return out[0].numel() * per_out


def _attention_macs(module, args, kwargs) -> int:
    """Q K^T and softmax(.) V per sample: 2 x query tokens x key tokens x inner dim."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    n_q = hidden[0, 0].numel() if hidden.ndim == 4 else hidden.shape[1]  # (B, C, H, W) or (B, N, C)
    n_k = n_q if context is None else context.shape[1]
    return 2 * n_q * n_k * module.inner_dim


def module_macs(unet: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """MACs per sample of every Conv2d, Linear and attention product that one forward `run()` executes, by module
    name (a module called twice counts twice)."""
    from diffusers.models.attention_processor import Attention

    counts: dict[str, int] = {}

    def add(name: str, macs: int) -> None:
        counts[name] = counts.get(name, 0) + macs

    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: add(name, _layer_macs(m, o))))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_pre_hook(lambda m, a, k, name=name: add(name, _attention_macs(m, a, k)),
                                                     with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    if not counts:
        raise ValueError("the forward ran no convolution or linear layer of this UNet: nothing to weigh blocks by")
    return counts


def block_costs(unet: nn.Module, blocks, run: Callable[[], object]) -> dict[str, float]:
    """AutoDiffusion's budget counts executed blocks; here each skippable block weighs what skipping it saves: its
    MACs less what still runs when skipped (a resnet's 1x1 shortcut), over the MACs of the whole forward `run()`."""
    counts = module_macs(unet, run)
    total = sum(counts.values())
    costs = {}
    for block in blocks:
        inside = sum(v for k, v in counts.items() if k == block or k.startswith(block + "."))
        kept = counts.get(block + ".conv_shortcut", 0)
        costs[block] = (inside - kept) / total
    return costs
