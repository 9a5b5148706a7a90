"""Reflow pairs: (noise, teacher sample, condition) from the teacher's probability-flow ODE, in a resumable store.

A store is a folder with manifest.json (what made the pairs) and shard-NNNNN.pt files, each written atomically
with noise drawn from (seed, shard index) alone: a killed run leaves only whole shards, and a rerun generates
exactly the missing ones, identical to an uninterrupted run. Processes split the shards (shard i goes to rank
i mod world), so `accelerate launch` generates pairs on every GPU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dstudio.distill.core.denoiser import start_state
from dstudio.distill.core.errors import UserError
from dstudio.distill.core.io import atomic_path, drop_stale_temps, save_torch
from dstudio.distill.core.signals import Stopped, received

MANIFEST = "manifest.json"
SOLVERS = ("dpmpp", "heun")  # the teacher-ODE solvers of a store: samplers.get_sampler names (DPM-Solver++ 2M, Heun)


class PairStoreError(UserError):
    """A pair store that cannot be used for this run (made with other settings, or damaged)."""


def solve_teacher_ode(teacher, z: Tensor, cond, solver: str = "dpmpp", steps: int = 25,
                      guidance: float = 1.0) -> Tensor:
    """The teacher's probability-flow ODE from unit noise z at its noisiest step to x1 (DPM-Solver++ 2M or Heun), with
    the teacher scheduler's clip_sample / thresholding applied to x0 as diffusers would."""
    from dstudio.samplers import append_zero, discrete_timesteps, get_sampler

    d = teacher.denoiser
    sigmas = append_zero(d.schedule.timesteps_to_sigmas(discrete_timesteps(teacher.num_train_timesteps, steps)))
    sigmas = sigmas.to(z.device)
    x = start_state(d, z, sigmas[0])  # unit noise in the teacher's own state at its noisiest step
    return get_sampler(solver)(teacher.for_sampling(guidance), x, sigmas, cond)


class Pairs(NamedTuple):
    """A micro-batch of reflow pairs: noise z, the sample x1 its ODE reaches, and its condition (None: none)."""

    z: Tensor
    x1: Tensor
    cond: object  # the denoisers' condition (a Conditioning; stored as ids or None)

    @property
    def size(self) -> int:
        return len(self.z)


class PairBatches:
    """A loaded pair store as a batch source the Trainer streams: each draw takes `size` pairs uniformly at random
    with the global torch generator (whose state a checkpoint keeps, so a resume draws the same pairs); `condition`
    turns the stored condition ids into the denoisers' condition."""

    def __init__(self, pairs: dict[str, Tensor | None], condition=lambda ids: ids):
        self.pairs, self.condition = pairs, condition

    def next(self, size: int, device) -> Pairs:
        idx = torch.randint(0, len(self.pairs["z"]), (size,))
        cond = self.pairs["cond"]
        return Pairs(self.pairs["z"][idx].to(device), self.pairs["x1"][idx].to(device),
                     self.condition(None if cond is None else cond[idx].to(device)))


class PairStore:
    """The on-disk pairs of one teacher and one solver setting."""

    def __init__(self, root: str | Path, spec: dict):
        self.root, self.spec = Path(root), dict(spec)
        self.num_pairs, self.shard_size = int(spec["num_pairs"]), int(spec["shard_size"])

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_pairs / self.shard_size)

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.pt"

    def open(self) -> "PairStore":
        """Create the store, or check that an existing one was made with the same settings."""
        manifest = self.root / MANIFEST
        if manifest.is_file():
            try:
                have = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                raise PairStoreError(f"pair store '{self.root}' has a corrupt {MANIFEST}; delete the folder") from None
            diff = {k: (have.get(k), v) for k, v in self.spec.items() if have.get(k) != v}
            if diff:
                key, (old, new) = next(iter(diff.items()))
                raise PairStoreError(f"pair store '{self.root}' was made with {key}={old!r}, this run asks for "
                                     f"{new!r}: use another method.pairs folder or the same settings")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps(self.spec, indent=2) + "\n")
        for i in range(self.num_shards):
            drop_stale_temps(self.shard_path(i))
        return self

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_path(i).is_file()]

    def generate(self, teacher, cond_for, batch_size: int = 250, rank: int = 0, world: int = 1,
                 progress: bool = True, solve=None, condition=lambda ids: ids) -> None:
        """Write this process's missing shards; `cond_for(indices)` gives the condition id of each pair index (stored),
        `condition(ids)` the denoisers' condition of those ids, and `solve(z, cond)` the image of each noise (default:
        the teacher's ODE with the store's solver settings)."""
        spec = self.spec
        if solve is None:
            solve = lambda z, c: solve_teacher_ode(teacher, z, c, spec["solver"], spec["solver_steps"],  # noqa: E731
                                                   spec["guidance"])
        todo = self.missing()[rank::world]
        device = teacher.denoiser.alphas_cumprod.device
        sizes = [min(self.shard_size, self.num_pairs - i * self.shard_size) for i in todo]
        bar = tqdm(total=sum(sizes), desc="reflow pairs", disable=not progress or not todo,
                   unit="pair", dynamic_ncols=True)
        with bar:  # closed (its line ended) before an error is printed
            for i in todo:
                start = i * self.shard_size
                idx = torch.arange(start, min(start + self.shard_size, self.num_pairs))
                g = torch.Generator().manual_seed(int(spec["seed"]) * 1_000_003 + i)
                z = torch.randn((len(idx), *teacher.sample_shape), generator=g)
                cond = cond_for(idx)
                x1 = []
                for j in range(0, len(idx), batch_size):
                    c = condition(None if cond is None else cond[j:j + batch_size].to(device))
                    x1.append(solve(z[j:j + batch_size].to(device), c).float().cpu())
                    bar.update(len(z[j:j + batch_size]))
                save_torch({"z": z, "x1": torch.cat(x1), "cond": cond}, self.shard_path(i))
                if received():  # a stop signal: the shards written so far are kept, a rerun makes the rest
                    kept = self.num_shards - len(self.missing())
                    raise Stopped(f"stopped while generating reflow pairs ({kept} of {self.num_shards} shards kept in "
                                  f"'{self.root}'); rerun the same command", received())

    def load(self) -> dict[str, Tensor | None]:
        missing = self.missing()
        if missing:
            raise PairStoreError(f"pair store '{self.root}' lacks shard {missing[0]}; rerun to generate it")
        shards = []
        for i in range(self.num_shards):
            try:
                shards.append(torch.load(self.shard_path(i), map_location="cpu", weights_only=True))
            except Exception as e:
                raise PairStoreError(f"pair shard '{self.shard_path(i)}' is corrupt ({type(e).__name__}); "
                                     f"delete it and rerun to regenerate it") from None
        cat = lambda k: None if shards[0][k] is None else torch.cat([s[k] for s in shards])  # noqa: E731
        return {"z": cat("z"), "x1": cat("x1"), "cond": cat("cond")}
