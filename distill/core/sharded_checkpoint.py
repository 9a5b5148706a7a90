"""Sharded checkpoints (trainer.strategy=fsdp): a folder `checkpoint/` in the run folder holding

  checkpoint.pt                       what every rank shares: step, config, data order, optimiser settings (tensors
                                      and plain data, read with weights_only=True, as a plain checkpoint.pt)
  rank-00000-of-00002.safetensors     each rank's shards of the networks, optimiser states and EMA, its own RNG
                                      state (safetensors: read without running any code)

Written into a temporary sibling folder by every rank, renamed over `checkpoint/` by rank 0 once every rank's file is
whole (barriers around), so a kill at any point leaves the previous checkpoint. Read back on any number of processes:
a DTensor's full value is its ranks' shards concatenated along dim 0 (FSDP's layout), re-cut for the reader's ranks;
a 1-process (or data-parallel) run reads the full values.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from dstudio.distill.core.checkpoint import SHARDED
from dstudio.distill.core.errors import UserError
from dstudio.distill.core.sharding import is_sharded, local

COMMON = "checkpoint.pt"


def shard_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def flatten(state: dict) -> dict[str, Tensor]:
    """The tensors of a trainer state (modules, optimiser states, EMA) under dotted keys."""
    out = {}
    for name, sd in state["modules"].items():
        out.update({f"modules.{name}.{k}": v for k, v in sd.items()})
    for name, sd in state["optimizers"].items():
        for idx, per_param in sd["state"].items():
            out.update({f"optimizers.{name}.{idx}.{k}": v for k, v in per_param.items() if torch.is_tensor(v)})
    out.update({f"ema.{i}": v for i, v in enumerate(state["ema"])})
    return out


def common_part(state: dict) -> dict:
    """What every rank shares: the state without its tensors (optimisers keep their settings and step counts)."""
    optimizers = {n: {"param_groups": sd["param_groups"], "keys": {str(i): sorted(s) for i, s in sd["state"].items()}}
                  for n, sd in state["optimizers"].items()}
    skip = ("modules", "optimizers", "ema", "rng")
    return {**{k: v for k, v in state.items() if k not in skip}, "optimizers": optimizers, "sharded": True,
            "modules": {n: sorted(sd) for n, sd in state["modules"].items()}, "ema": len(state["ema"])}


def rng_tensors(rng: dict) -> tuple[dict[str, Tensor], str]:
    """A process's RNG state (checkpoint.rng_state) as tensors plus a JSON string of its small values."""
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    version, internal, py_gauss = rng["python"]
    tensors = {"rng.torch": rng["torch"], "rng.numpy": keys, "rng.python": torch.tensor(internal, dtype=torch.int64)}
    small = {"numpy": [name, pos, has_gauss, gauss], "python": [version, py_gauss]}
    return tensors, json.dumps(small)


def rng_from(tensors, small: str) -> dict:
    s = json.loads(small)
    name, pos, has_gauss, gauss = s["numpy"]
    version, py_gauss = s["python"]
    return {"torch": tensors.get_tensor("rng.torch"),
            "numpy": [name, tensors.get_tensor("rng.numpy"), pos, has_gauss, gauss],
            "python": [version, tensors.get_tensor("rng.python").tolist(), py_gauss]}


def save_sharded(state: dict, run_dir: Path) -> None:
    """Every rank writes its shards; rank 0 the common part, then renames the folder into place (collective)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = run_dir / SHARDED, run_dir / f".{SHARDED}.tmp-step{state['step']}"
    if rank == 0:  # the temporary folders of saves that were killed half-way go first
        for stale in run_dir.glob(f".{SHARDED}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = {k: local(v).detach().cpu().contiguous() for k, v in flatten(state).items()}
    sharded = [k for k, v in flatten(state).items() if is_sharded(v)]
    rng, small = rng_tensors(state["rng"])
    path = tmp / shard_name(rank, world)
    save_file({**tensors, **rng}, str(path), metadata={"sharded": json.dumps(sharded), "rng": small})
    _fsync(path)
    if rank == 0:
        torch.save({**common_part(state), "world": world}, tmp / COMMON)
        _fsync(tmp / COMMON)
    dist.barrier()
    if rank == 0:
        old = run_dir / f".{SHARDED}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class ShardedReader:
    """A sharded checkpoint folder, read lazily: `tensor(key)` is a full value (its ranks' shards concatenated)."""

    def __init__(self, folder: Path, common: dict):
        from safetensors import safe_open

        self.folder, self.common, self.world = folder, common, common["world"]
        paths = [folder / shard_name(r, self.world) for r in range(self.world)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"sharded checkpoint '{folder}' lacks {missing[0]}; --overwrite starts over")
        self.files = [safe_open(str(p), framework="pt") for p in paths]
        self.sharded = set(json.loads(self.files[0].metadata()["sharded"]))

    def tensor(self, key: str) -> Tensor:
        if key not in self.sharded:
            return self.files[0].get_tensor(key)
        return torch.cat([f.get_tensor(key) for f in self.files], dim=0)

    def rng(self, rank: int) -> dict:
        """The RNG state of the saving rank `rank` (the last one's for readers with more ranks than it had)."""
        f = self.files[min(rank, self.world - 1)]
        return rng_from(f, f.metadata()["rng"])

    def modules(self) -> dict[str, dict]:
        return {n: {k: self.tensor(f"modules.{n}.{k}") for k in keys} for n, keys in self.common["modules"].items()}

    def optimizers(self) -> dict[str, dict]:
        out = {}
        for name, sd in self.common["optimizers"].items():
            state = {int(i): {k: self.tensor(f"optimizers.{name}.{i}.{k}") for k in keys}
                     for i, keys in sd["keys"].items()}
            out[name] = {"state": state, "param_groups": sd["param_groups"]}
        return out

    def ema(self) -> list[Tensor]:
        return [self.tensor(f"ema.{i}") for i in range(self.common["ema"])]

    def local_state(self, method, optimizers: dict, ema, rank: int) -> dict:
        """The checkpoint cut for this run's sharded networks, optimisers and EMA: each value read whole, cut to this
        process's piece at once (a full tensor at a time in memory, never the whole checkpoint)."""
        from dstudio.distill.core.sharding import shard_like

        modules = {}
        for name, keys in self.common["modules"].items():
            targets = getattr(method, name).state_dict()
            modules[name] = {k: shard_like(self.tensor(f"modules.{name}.{k}"), targets.get(k)) for k in keys}
        opt_states = {}
        for name, sd in self.common["optimizers"].items():
            params = [p for group in optimizers[name].param_groups for p in group["params"]]
            state = {int(i): {k: shard_like(self.tensor(f"optimizers.{name}.{i}.{k}"), None if k == "step" else
                                            params[int(i)]) for k in keys} for i, keys in sd["keys"].items()}
            opt_states[name] = {"state": state, "param_groups": sd["param_groups"]}
        shadow = [shard_like(self.tensor(f"ema.{i}"), t) for i, t in enumerate(ema.shadow[:self.common["ema"]])]
        return {**self.common, "modules": modules, "optimizers": opt_states, "ema": shadow, "rng": self.rng(rank)}

    def full_state(self, rank: int = 0) -> dict:
        """The checkpoint as a plain one (full tensors): what Trainer.restore reads on any strategy."""
        return {**self.common, "modules": self.modules(), "optimizers": self.optimizers(), "ema": self.ema(),
                "rng": self.rng(rank)}


def read_sharded(folder: Path) -> dict:
    """A sharded checkpoint's state: its common part (checked like a plain checkpoint by the caller) plus its full
    tensors, read lazily by whoever restores it (`state["reader"]`)."""
    from dstudio.distill.core.checkpoint import read_checkpoint

    common = read_checkpoint(folder / COMMON)
    return {**common, "reader": ShardedReader(folder, common)}
