"""The run's data as an endless, resumable stream of shuffled mini-batches, one slice per process."""
from __future__ import annotations

import torch
from torch import Tensor

from dstudio.distill.core.method import Batch


class BatchStream:
    """An endless, resumable stream of shuffled mini-batches; each process takes its own slice."""

    def __init__(self, data, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0

    def _order(self) -> Tensor:
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next(self, device) -> Batch:
        need = self.batch_size * self.world
        order, idx, have = self._order(), [], 0
        while have < need:
            take = order[self.pos:self.pos + need - have]
            idx.append(take)
            have += len(take)
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
        idx = torch.cat(idx)[self.rank::self.world]
        return Batch.of(self.data.images[idx].to(device), self.data.labels[idx].to(device))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
