"""LoRA students and fake scores (Hu et al. 2021): peft adapters over ONE shared frozen teacher backbone.

`trainable_copy(unet, role, lora=config)` returns an `AdapterView` when `config.lora_rank > 0`: the adapter is
injected into the teacher's own UNet (its weights are not copied), and the view is the module whose parameters
are that adapter's alone, so optimisers, EMA and checkpoints see only them. Calling the view runs the backbone
with its adapter on; the teacher's own calls run with every adapter off (bit-identical to the bare teacher).
Export: `fused_unet(view)` (W + B A alpha / r, a plain diffusers UNet) and `lora_state(view)` (the peft state
dict with `unet.` keys that diffusers' `load_lora_weights` reads).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from dstudio.distill.core.config import require

# a UNet's: the modules DMD2's own LoRA adapts (tianweiy/DMD2, sd_unified_model.py): attention, feed-forward, resnets
# (their shortcuts too), resamplers and time projections
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                   "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# a transformer's (DiT, PixArt, SD3, FLUX): attention and feed-forward of the image stream, SD3's / FLUX's text stream
# (add_*_proj, to_add_out, ff_context), FLUX's single blocks (proj_mlp, proj_out); the final top-level proj_out is not
# matched (a target needs a parent module)
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class LoraOptions:
    """The method-config keys of a LoRA run (`--lora-rank R`, `--set method.lora_alpha=A`, `method.lora_targets`)."""

    lora_rank: int = field(default=0, metadata={  # 0: full trainable copies of the teacher
        "cli": "--lora-rank", "min": 0,
        "help": "LoRA students and fake scores of this rank over the teacher's own weights (0: full copies)"})
    lora_alpha: float | None = None     # None: the rank (scale alpha / r = 1)
    lora_targets: tuple[str, ...] | None = None  # module-name suffixes that get adapters (None: the network's own,
                                                 # default_targets)
    lora_fake_score: bool = True        # False: a full trainable fake score beside the adapter student (DMD2's
                                        # own LoRA recipe: more memory, a closer fake score)
    lora_plus_ratio: float = 1.0        # LoRA+ (Hayou et al. 2024): the B factors' learning rate over the A factors'

    def __post_init__(self) -> None:
        require(self.lora_rank >= 0, f"method.lora_rank={self.lora_rank} must be >= 0 (0: full copies)")
        require(self.lora_alpha is None or self.lora_alpha > 0, f"method.lora_alpha={self.lora_alpha} must be > 0")
        require(self.lora_targets is None or len(self.lora_targets) > 0,
                "method.lora_targets must name at least one module")
        require(self.lora_plus_ratio > 0, f"method.lora_plus_ratio={self.lora_plus_ratio} must be > 0 (1: plain LoRA)")


def default_targets(network: nn.Module) -> tuple[str, ...]:
    """The LoRA targets of a network: a UNet's DEFAULT_TARGETS, else a transformer's TRANSFORMER_TARGETS."""
    return DEFAULT_TARGETS if hasattr(getattr(network, "base", network), "down_blocks") else TRANSFORMER_TARGETS


def lora_rank(config) -> int:
    return getattr(config, "lora_rank", 0) or 0


def lora_layers(base: nn.Module) -> dict[str, nn.Module]:
    """{module path: peft LoRA layer} of a backbone."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def _set_adapter(layers, name: str | None) -> None:
    """Turn on adapter `name` alone (None: all off) without touching requires_grad (peft's set_adapter would)."""
    for layer in layers:
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]


@contextlib.contextmanager
def adapter_active(base: nn.Module, name: str | None):
    """The shared backbone with adapter `name` on (None: the teacher) for the block; the previous state after."""
    layers = base._dstudio_lora_layers
    before = base._dstudio_adapter
    _set_adapter(layers, name)
    base._dstudio_adapter = name
    try:
        yield
    finally:
        _set_adapter(layers, before)
        base._dstudio_adapter = before


def inject_adapter(base: nn.Module, name: str, rank: int, alpha: float, targets) -> None:
    """Add LoRA adapter `name` (B = 0: the view starts as the teacher) to `base`; every adapter stays off at rest."""
    from peft import LoraConfig, inject_adapter_in_model

    pattern = "|".join(t.replace(".", r"\.") for t in targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=rf".*\.({pattern})$", init_lora_weights=True)
    with warnings.catch_warnings():  # "multiple adapters in the model": the student and the fake score, by design
        warnings.simplefilter("ignore")
        inject_adapter_in_model(cfg, base, adapter_name=name)
    layers = list(lora_layers(base).values())
    require(layers, f"method.lora_targets={list(targets)} match no Linear or Conv2d module of the teacher's network")
    base._dstudio_lora_layers = layers
    base._dstudio_adapter = None
    base._dstudio_lora_configs = {**getattr(base, "_dstudio_lora_configs", {}), name: cfg}
    _set_adapter(layers, None)
    base.requires_grad_(False)


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict names cannot hold dots


class AdapterView(nn.Module):
    """One LoRA adapter of a shared frozen backbone as a module: calling it runs the backbone with this adapter on.

    Its parameters (and state_dict) are the adapter's alone; attributes it lacks (config, mid_block, dtype, ...)
    are the backbone's."""

    def __init__(self, base: nn.Module, name: str, plus_ratio: float = 1.0):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: its weights are the teacher's
        self.adapter_name = name
        self.plus_ratio = plus_ratio
        self.adapter = nn.ModuleDict({
            _key(path): nn.ModuleDict({"lora_A": layer.lora_A[name], "lora_B": layer.lora_B[name]})
            for path, layer in lora_layers(base).items() if name in layer.lora_A})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "base"), name)

    def forward(self, *args, **kwargs):
        with adapter_active(self.base, self.adapter_name):
            return self.base(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self.base._apply(fn, recurse)  # device moves follow the view (the backbone is shared: idempotent)
        return super()._apply(fn, recurse)

    @property
    def lora_config(self):
        return self.base._dstudio_lora_configs[self.adapter_name]

    def lr_scales(self) -> dict[int, float]:
        """{id(parameter): learning-rate scale}: LoRA+ (Hayou et al. 2024, Alg. 1) trains B at `plus_ratio` x A's rate."""
        return {id(p): self.plus_ratio for name, p in self.adapter.named_parameters() if ".lora_B." in f".{name}"}


def adapter_view(unet: nn.Module, role: str, config) -> AdapterView:
    """A LoRA adapter named after `role` (numbered when taken: MSD's K students) over `unet` itself."""
    taken = getattr(unet, "_dstudio_lora_configs", {})
    name, k = role, 1
    while name in taken:
        name, k = f"{role}_{k}", k + 1
    alpha = config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)
    inject_adapter(unet, name, config.lora_rank, alpha, config.lora_targets or default_targets(unet))
    return AdapterView(unet, name, getattr(config, "lora_plus_ratio", 1.0))


def _base_key(key: str) -> str | None:
    """A wrapped backbone's state-dict key as the plain backbone names it (None: an adapter tensor)."""
    if ".lora_" in key:
        return None
    return key.replace(".base_layer.", ".")


@torch.no_grad()
def plain_copy(base: nn.Module, delta: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A new plain backbone (no adapters) with `base`'s own weights, plus `delta` {module path: dW}: in float32
    when `base` carries adapters, else a deep copy."""
    if not lora_layers(base):
        return copy.deepcopy(base)
    plain = type(base).from_config(base.config)
    state = {k2: v.float() for k, v in base.state_dict().items() if (k2 := _base_key(k)) is not None}
    for path, dw in (delta or {}).items():
        state[f"{path}.weight"] = state[f"{path}.weight"] + dw.float()
    plain.load_state_dict(state)
    return plain.to(next(base.parameters()).device)


@torch.no_grad()
def fused_unet(net: nn.Module) -> nn.Module:
    """A plain backbone with the view's adapter merged (W + (alpha / r) B A), in float32; other modules as they are."""
    if not isinstance(net, AdapterView):
        return net
    return plain_copy(net.base, {path: layer.get_delta_weight(net.adapter_name)
                                 for path, layer in lora_layers(net.base).items() if net.adapter_name in layer.lora_A})


def lora_state(net: AdapterView) -> dict[str, torch.Tensor]:
    """The adapter's peft state dict (`<module path>.lora_A.weight`, ...), as diffusers' LoRA loaders read it."""
    state = {}
    for path, layer in lora_layers(net.base).items():
        if net.adapter_name in layer.lora_A:
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part)[net.adapter_name].weight
                state[f"{path}.{part}.weight"] = weight.detach().float().cpu().contiguous()
    return state


def save_lora(net: AdapterView, folder) -> None:
    """Write `folder/pytorch_lora_weights.safetensors` as diffusers writes a UNet LoRA (keys under `unet.`, the
    rank and alpha as its metadata), for `pipe.load_lora_weights(folder)` on the teacher's own pipeline."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state = lora_state(net)
    meta = {"r": net.lora_config.r, "lora_alpha": net.lora_config.lora_alpha,
            "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in state})}
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(folder), unet_lora_layers=state,
                                                     unet_lora_adapter_metadata=meta)
