"""Memory levers of a large run: gradient checkpointing of the trained backbones (Chen et al. 2016)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dstudio.distill.core.lora import AdapterView, adapter_active


def _adapter_checkpoint(base: nn.Module):
    """torch's checkpoint for a backbone shared by LoRA views: the recomputation in backward runs with the adapter
    that was on in the forward pass (the views switch adapters per call, so backward may find another one on)."""

    def checkpoint(fn, *args):
        name = base._dstudio_adapter
        return torch.utils.checkpoint.checkpoint(
            fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), adapter_active(base, name)))

    return checkpoint


def trained_backbones(method) -> list[nn.Module]:
    """The diffusers backbones a method trains (a LoRA view's shared base once), in its phases' modules."""
    out: list[nn.Module] = []
    for name in method.trainable_modules():
        for m in getattr(method, name).modules():
            net = m.base if isinstance(m, AdapterView) else m
            if getattr(net, "_supports_gradient_checkpointing", False) and all(net is not o for o in out):
                out.append(net)
    return out


def enable_gradient_checkpointing(method) -> int:
    """Recompute the trained backbones' block activations in backward instead of storing them; returns how many."""
    nets = trained_backbones(method)
    for net in nets:
        lora = hasattr(net, "_dstudio_lora_layers")
        net.enable_gradient_checkpointing(_adapter_checkpoint(net) if lora else None)
    return len(nets)


FROZEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_dtype(frozen: str, mixed_precision: str) -> torch.dtype | None:
    """The dtype the frozen weights are kept in: trainer.frozen_dtype, `auto` being mixed precision's (None: as is)."""
    name = mixed_precision if frozen == "auto" else frozen
    return FROZEN_DTYPES.get(name)


@torch.no_grad()
def cast_frozen(method: nn.Module, dtype: torch.dtype) -> int:
    """Keep every floating-point parameter no phase trains (the teacher, a LoRA run's shared base) in `dtype`; the
    trained ones stay float32 for the optimiser. Returns how many parameters were cast."""
    trained = {id(p) for phase in method.phases() for p in method.phase_parameters(phase)}
    n = 0
    for p in method.parameters():
        if id(p) not in trained and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n
