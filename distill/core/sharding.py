"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for a Method: trainer.strategy=fsdp.

Every diffusers backbone a method holds (student, fake score, frozen teacher, a LoRA run's shared base) is sharded
per block (a UNet's down / mid / up blocks, a transformer's blocks), then as a whole; what is left (a GAN head, a toy
network) is sharded as one unit per child module. Each process then holds 1/N of every parameter, and AdamW, built
over the sharded (DTensor) parameters, 1/N of the optimiser state; the EMA's copies are DTensors too. Mixed precision
is FSDP's `MixedPrecisionPolicy` (trained networks gathered in trainer.mixed_precision's dtype, frozen ones in their own,
trainer.frozen_dtype; gradients reduced in float32) under accelerate's autocast, as on one process; bf16 only.

accelerate's FSDP plugin does not run on CPUs (accelerate turns FSDP on for accelerators only), so the Trainer
applies `fully_shard` itself to the process group that `accelerate launch` / `torchrun` set up.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch
from torch import Tensor, nn

from dstudio.distill.core.config import require

STRATEGIES = ("ddp", "fsdp")
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")
BLOCKS = ("mid_block",)
# parts of a block its backbone calls outside the block's own forward (DiT's forward runs transformer_blocks[0].norm1.emb
# for its conditioning): units of their own, so that such a call gathers their weights
CALLED_FROM_OUTSIDE = ("norm1.emb",)
MP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_strategy(strategy: str, mixed_precision: str = "no") -> None:
    require(strategy in STRATEGIES, f"trainer.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    require(strategy != "fsdp" or mixed_precision != "fp16",
            "trainer.strategy=fsdp takes trainer.mixed_precision=no or bf16 (fp16 needs a gradient scaler for sharded "
            "gradients, which the Trainer does not have)")


def launched_processes() -> int:
    """The processes of this launch (`accelerate launch` and `torchrun` set WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_mesh(device: torch.device):
    """The 1-D mesh of all processes (gloo on CPUs, nccl on GPUs)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def blocks(net: nn.Module) -> list[nn.Module]:
    """A diffusers backbone's blocks, the units FSDP all-gathers one at a time: a UNet's down / mid / up blocks, a
    transformer's (DiT, PixArt, SD3's joint, FLUX's double and single) blocks."""
    out = []
    for name in BLOCK_LISTS:
        out += list(getattr(net, name, None) or [])
    out += [getattr(net, name) for name in BLOCKS if isinstance(getattr(net, name, None), nn.Module)]
    return [b for b in out if any(True for _ in b.parameters())]


def backbones(method: nn.Module) -> list[nn.Module]:
    """The diffusers models among a method's submodules (each once: a LoRA run's base is shared)."""
    from diffusers import ModelMixin

    out: list[nn.Module] = []
    for m in method.modules():
        if isinstance(m, ModelMixin) and all(m is not o and m not in list(o.modules()) for o in out):
            out.append(m)
    return out


def _outside_parts(block: nn.Module) -> list[nn.Module]:
    parts = []
    for path in CALLED_FROM_OUTSIDE:
        try:
            parts.append(block.get_submodule(path))
        except AttributeError:
            pass
    return [p for p in parts if any(True for _ in p.parameters())]


def policy(dtype: torch.dtype | None):
    """FSDP's mixed precision: compute in `dtype` (None: as stored), reduce gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def shard_method(method: nn.Module, mesh, mixed_precision: str = "no", frozen: torch.dtype | None = None) -> int:
    """Shard every parameter of `method` in place (see the module doc); returns the number of FSDP units."""
    from torch.distributed.fsdp import fully_shard

    trained = {id(p) for phase in method.phases() for p in method.phase_parameters(phase)}
    units = 0
    for net in backbones(method):
        is_trained = any(id(p) in trained for p in net.parameters())
        mp = policy(MP_DTYPES.get(mixed_precision) if is_trained else frozen)
        for block in blocks(net):
            for part in _outside_parts(block):
                fully_shard(part, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
                units += 1
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        units += len(blocks(net)) + 1
    units += _shard_rest(method, mesh, policy(MP_DTYPES.get(mixed_precision)))
    loose = [n for n, p in method.named_parameters() if not is_sharded(p)]
    if loose:
        raise RuntimeError(f"trainer.strategy=fsdp: parameter {loose[0]} is held by the method itself, not by a "
                           f"submodule, so it is not sharded")
    return units


def reshard(method: nn.Module) -> None:
    """Free every gathered weight (the roots keep theirs from forward to backward: a backward that reaches a root's
    weights through features tapped mid-network, not through its output, finds them there). Called after each
    update's backward and after sampling, so that optimiser steps, the EMA and checkpoints see the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in method.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _shard_rest(module: nn.Module, mesh, mp) -> int:
    """Shard the children of `module` whose parameters no backbone covers (one unit each); returns how many."""
    from torch.distributed.fsdp import fully_shard

    units = 0
    for child in module.children():
        params = list(child.parameters())
        if not params or all(is_sharded(p) for p in params):
            continue
        if any(is_sharded(p) for p in params):
            units += _shard_rest(child, mesh, mp)
            if any(not is_sharded(p) for p in child.parameters(recurse=False)):
                fully_shard(child, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
                units += 1
        else:
            fully_shard(child, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
            units += 1
    return units


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t):
    """A DTensor's whole value (an all-gather: every process must call it); anything else as is."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (a plain tensor as is)."""
    return t.to_local() if is_sharded(t) else t


def shard_like(full: Tensor, target):
    """`full` cut the way `target` (a DTensor sharded on dim 0, FSDP's layout) is: this process's piece of it (a
    copy: the whole is freed) as a DTensor; a plain target (or None) takes `full` as is, and a DTensor stays one."""
    if not is_sharded(target) or is_sharded(full):
        return full
    from torch.distributed.tensor import DTensor

    mesh, rank = target.device_mesh, target.device_mesh.get_local_rank()
    pieces = list(full.chunk(mesh.size(), dim=0))
    pieces += [full.new_empty((0, *full.shape[1:]))] * (mesh.size() - len(pieces))
    piece = pieces[rank].to(device=target.device, dtype=target.dtype, copy=True).contiguous()
    return DTensor.from_local(piece, mesh, target.placements, shape=full.shape, stride=full.stride())


@contextlib.contextmanager
def gradient_sync(method: nn.Module, enabled: bool):
    """Within the block, FSDP units keep their gradients unreduced (enabled=False: all but the last micro-batch of
    gradient accumulation); they reduce at the next backward with sync on."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in method.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


def shared_bases(net: nn.Module) -> list[nn.Module]:
    """The backbones a network's LoRA views run on (not submodules of the views: the teacher's own)."""
    from dstudio.distill.core.lora import AdapterView

    return [m.base for m in net.modules() if isinstance(m, AdapterView)]


def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` (and of a LoRA view's base) whose parameters live on the meta device (no memory; buffers are
    copied): made before sharding, it becomes a plain network again from gathered state dicts (`plain_network`)."""
    parts = [net, *shared_bases(net)]
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for part in parts for p in part.parameters()}
    return copy.deepcopy(net, memo)


def full_state(net: nn.Module) -> list[dict[str, Tensor]]:
    """The whole parameters and buffers of `net` and of its LoRA views' bases (collective: every process calls it;
    all receive them)."""
    return [{k: full_tensor(v).detach().cpu() for k, v in part.state_dict().items()}
            for part in [net, *shared_bases(net)]]


def plain_network(template: nn.Module, states: list[dict[str, Tensor]], device) -> nn.Module:
    """The meta copy `template` as an ordinary network holding `states` (`full_state`'s)."""
    net = copy.deepcopy(template)
    for part, state in zip([net, *shared_bases(net)], states):
        part.load_state_dict(state, assign=True)
    leftover = [n for part in [net, *shared_bases(net)] for n, p in part.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"trainer.strategy=fsdp cannot export this student: {leftover[0]} is not in its state dict")
    return net.to(device)


def local_bytes(tensors) -> int:
    """The bytes this process holds of `tensors` (its shards of DTensors)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def optimizer_tensors(optimizer) -> list[Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]


def sharded_state(full: dict, targets: dict) -> dict:
    """A full state dict cut like `targets` (a sharded module's own state dict): what its load_state_dict takes."""
    return {k: shard_like(v, targets[k]) if k in targets else v for k, v in full.items()}


def sharded_optimizer_state(full: dict, optimizer) -> dict:
    """A full optimiser state dict cut like `optimizer`'s (sharded) parameters, indexed as its param_groups list
    them (the step counts stay whole)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: v if k == "step" or not torch.is_tensor(v) else shard_like(v, params[int(i)])
                 for k, v in per_param.items()}
             for i, per_param in full["state"].items()}
    return {**full, "state": state}


def end_distributed(barrier: bool = True) -> bool:
    """Destroy the process group at the end of a run, after every process got there (barrier=False: an error path,
    where a peer may never arrive), and collect the cycles that hold it; whether there was one."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    return True


def exit_distributed(code: int) -> int:
    """End a process of a distributed run with `code`: the group destroyed (`end_distributed`), then, where there was
    one, `os._exit(code)` after flushing, without the interpreter's shutdown; elsewhere `code` is returned.

    Why: torch keeps a gloo group that DDP or FSDP used alive after destroy_process_group (its worker threads run on),
    and a worker that releases its last work item (one holding a tensor Python created) during interpreter shutdown
    waits for the GIL of a finalising interpreter, which ends the thread by unwinding through a noexcept destructor:
    std::terminate, "terminate called without an active exception", exit -6 after a finished run (seen about once
    in 15 two-process runs here; a core dump shows ProcessGroupGloo::runLoop -> ~AsyncWork -> decref -> take_gil ->
    pthread_exit while the main thread is in Py_FinalizeEx)."""
    import logging

    if not end_distributed(barrier=code == 0):
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
