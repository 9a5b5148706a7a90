"""A deterministic toy method for the multi-process test: run as `python -m torch.distributed.run ... ddp_toy.py`."""
import os
import signal
import sys
from dataclasses import dataclass

import torch
from torch import nn

from dstudio.distill.core.method import Method, Phase
from dstudio.distill.core.trainer import Trainer, TrainerConfig
from dstudio.distill.data import LabelledImages


@dataclass
class ToyConfig:
    lr: float = 0.05


class Toy(Method):
    """Least squares on fixed data: no randomness in the loss, so any difference is the Trainer's."""

    name = "toy"
    Config = ToyConfig
    needs_teacher = False

    def __init__(self, config, stop_at: int = -1):
        super().__init__(config)
        self.stop_at = stop_at
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))

    def phases(self):
        return [Phase("fit", ("student",), loss=self.fit_loss, lr=self.config.lr, grad_clip=None)]

    def fit_loss(self, batch, step):
        if step == self.stop_at and int(os.environ.get("RANK", "0")) == 1:  # preemption reaching one rank only
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch.images, batch.labels
        loss = (self.student(x).squeeze(1) - y.float()).pow(2).mean()
        return loss, {"mse": loss.item()}

    def sample(self, labels, generator):
        return torch.zeros(len(labels), 1, 4, 4)

    def export(self, path):
        pass


if __name__ == "__main__":
    from dstudio.distill.core.signals import Stopped

    run, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    g = torch.Generator().manual_seed(1)
    data = LabelledImages(torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 3, (64,), generator=g),
                          ["a", "b", "c"], "toy")
    cfg = TrainerConfig(steps=5, batch_size=batch, grad_accum=accum, cpu=True, sample_every=1000,
                        checkpoint_every=5, ema_decay=0.5)
    try:
        Trainer(Toy(ToyConfig(), stop_at), cfg, run, data=data).fit(export=False)
    except Stopped as e:
        print(f"rank {os.environ.get('RANK', '0')}: {e}", file=sys.stderr)
        sys.exit(e.code)
