"""Deterministic methods for the multi-process tests: run as `python -m torch.distributed.run ... ddp_toy.py RUN ...`
(or plainly, as one process). `toy`: least squares with a small MLP; `regress`: a student copy of a real teacher
(a UNet or a DiT folder) regressed onto fixed targets next to the frozen teacher; `dmd2`: the real method on a teacher
folder. --report FILE writes this rank's parameter and optimiser bytes (JSON)."""
import argparse
import copy
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dstudio.distill.core.method import Distiller, Method, Phase
from dstudio.distill.core.trainer import Trainer, TrainerConfig
from dstudio.distill.data import LabelledImages


def preempt(step: int, stop_at: int) -> None:
    """Preemption reaching rank 1 only (rank 0 of a single process) during step `stop_at`."""
    if step == stop_at and int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        os.kill(os.getpid(), signal.SIGTERM)


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
        preempt(step, self.stop_at)
        x, y = batch.images, batch.labels
        loss = (self.student(x).squeeze(1) - y.float()).pow(2).mean()
        return loss, {"mse": loss.item()}

    def sample(self, labels, generator):
        return torch.zeros(len(labels), 1, 4, 4)

    def export(self, path):
        pass


@dataclass
class RegressConfig:
    lr: float = 1e-3


class Regress(Distiller):
    """A student copy of the teacher's backbone regressed (clipped Adam steps) onto x0 targets and the frozen
    teacher's own prediction at fixed sigma: deterministic, through the real backbones' blocks."""

    name = "regress"
    Config = RegressConfig

    def __init__(self, config, teacher, stop_at: int = -1):
        super().__init__(config, teacher)
        self.stop_at = stop_at
        self.teacher_net = teacher.denoiser
        self.student = self.student_of(copy.deepcopy(teacher.unet).requires_grad_(True))

    def phases(self):
        return [Phase("fit", ("student",), loss=self.fit_loss, lr=self.config.lr, grad_clip=1.0)]

    def train(self, mode: bool = True):
        """Always in eval mode: no dropout (DiT's label dropout draws per process)."""
        return super().train(False)

    def fit_loss(self, batch, step):
        preempt(step, self.stop_at)
        dtype = next(self.student.parameters()).dtype
        x, labels = batch.images.to(dtype), batch.labels
        sigma = torch.full((len(x),), 0.5, dtype=dtype)
        x_t, cond = x + 0.5 * torch.sin(3 * x), self.cond(labels)
        with torch.no_grad():
            target = self.teacher_net(x_t, sigma, cond)
        out = self.student(x_t, sigma, cond)
        loss = (out - x).pow(2).mean() + 0.1 * (out - target).pow(2).mean()
        return loss, {"mse": loss.item()}

    def sample(self, labels, generator):
        return torch.zeros(len(labels), *self._teacher.pixel_shape)

    def export(self, path):
        pass


def fixed_data(shape, classes: int, n: int = 64) -> LabelledImages:
    g = torch.Generator().manual_seed(1)
    return LabelledImages(torch.randn(n, *shape, generator=g), torch.randint(0, max(classes, 1), (n,), generator=g),
                          [str(c) for c in range(max(classes, 1))], "fixed")


def build(args):
    """(method, data) of the run."""
    if args.method == "toy":
        return Toy(ToyConfig(), args.stop_at), fixed_data((1, 4, 4), 3)
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(args.teacher, dtype=getattr(torch, args.dtype))
    if args.method == "regress":
        return Regress(RegressConfig(), teacher, args.stop_at), fixed_data(teacher.sample_shape, teacher.num_classes)
    from dstudio.distill.data import digits8
    from dstudio.distill.methods.dmd2 import DMD2, DMD2Config

    class StoppableDMD2(DMD2):
        def critic_loss(self, batch, step):
            preempt(step, args.stop_at)
            return super().critic_loss(batch, step)

    torch.manual_seed(0)
    data = teacher.to_model_space(digits8(8))
    cfg = DMD2Config(data="digits", critic_ratio=2, head_width=8, lr_generator=1e-4, lr_critic=1e-4,
                     lora_rank=args.lora_rank)
    return StoppableDMD2(cfg, teacher, data), data


def report(trainer: Trainer, path: str) -> None:
    from dstudio.distill.core.sharding import local_bytes, optimizer_tensors

    params = local_bytes(trainer.method.parameters())
    optim = local_bytes(t for o in trainer.optimizers.values() for t in optimizer_tensors(o))
    ema = local_bytes(trainer.ema.shadow)
    out = Path(f"{path}.rank{os.environ.get('RANK', '0')}.json")
    out.write_text(json.dumps({"params": params, "optimizer": optim, "ema": ema}))


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("batch", type=int)
    p.add_argument("accum", type=int)
    p.add_argument("stop_at", type=int, nargs="?", default=-1)
    p.add_argument("--method", default="toy", choices=("toy", "regress", "dmd2"))
    p.add_argument("--teacher")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--frozen-dtype", default="float32")
    p.add_argument("--report", help="write this rank's bytes to REPORT.rankN.json")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="the teacher's (and its student copy's) dtype")
    return p.parse_args(argv)


def run(args) -> int:
    """Train (and report); the exit status."""
    from dstudio.distill.core.signals import Stopped

    method, data = build(args)
    cfg = TrainerConfig(steps=args.steps, batch_size=args.batch, grad_accum=args.accum, cpu=True, sample_every=1000,
                        checkpoint_every=args.checkpoint_every, ema_decay=0.5, strategy=args.strategy,
                        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
                        frozen_dtype=args.frozen_dtype)
    cfg.validate()
    try:
        trainer = Trainer(method, cfg, args.run, data=data)
        trainer.fit(resume=args.resume, export=args.export)
        if args.report:
            report(trainer, args.report)
    except Stopped as e:
        print(f"rank {os.environ.get('RANK', '0')}: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    from dstudio.distill.core.sharding import exit_distributed

    sys.exit(exit_distributed(run(parse())))
