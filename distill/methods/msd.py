"""MSD (Song et al. 2024): several one-step students, each owning a partition of the classes, trained with DMD2."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from dstudio.distill.core.config import require
from dstudio.distill.core.method import Batch, Phase, RunContext, register
from dstudio.distill.core.pipeline_dstudio import class_embeddings
from dstudio.distill.core.routed_unet import RoutedUNet2DModel, routed
from dstudio.distill.core.score import dsm_loss, sample_timesteps, smaller_unet, trainable_copy
from dstudio.distill.methods.dmd2 import DMD2, DMD2Config, DiscriminatorHead, bottleneck


@dataclass
class MSDConfig(DMD2Config):
    students: int = field(default=4, metadata={"cli": "--students", "min": 1, "help": "number of students K"})
    partition: list[list[int]] | None = None  # None: contiguous class ranges of (nearly) equal size
    student_width: float = field(default=1.0, metadata={  # < 1 builds smaller students, TSM-initialised
        "cli": "--student-width", "help": "channel multiplier of smaller students (0.5: about 1/4 of the parameters)"})
    tsm_steps: int = 500                      # teacher score matching steps before distillation (smaller students)
    lr_tsm: float = 1e-4
    # a fake score + GAN head per student (each sees only its classes), or one shared by all; per student measured
    # 0.058 against 0.136 shared (quick, K = 4, FID-mnist; benchmarks/distill.py msd-k4 / msd-k4-shared-critic)
    critics: Literal["shared", "per_student"] = "per_student"
    # each student's own batch of its classes per step (the paper's), or one batch split among them by label
    batches: Literal["per_student", "split"] = "per_student"
    dm_steps: int = 0                         # distribution matching without the GAN before the adversarial stage

    def validate(self) -> None:
        super().validate()
        require(self.dm_steps >= 0, f"method.dm_steps={self.dm_steps} must be >= 0")
        require(self.students >= 1, f"method.students={self.students} must be >= 1")
        require(0 < self.student_width <= 1, f"method.student_width={self.student_width} must be in (0, 1]")
        require(not self.lora_rank or self.student_width == 1, "method.lora_rank > 0 adapts the teacher's own weights: "
                                                              "it needs full-width students (--student-width 1)")
        require(self.tsm_steps >= 0, f"method.tsm_steps={self.tsm_steps} must be >= 0")


def contiguous_partition(num_classes: int, k: int) -> list[list[int]]:
    """Classes 0..n-1 split into k contiguous ranges whose sizes differ by at most one."""
    bounds = [i * num_classes // k for i in range(k + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def check_partition(partition: list[list[int]], num_classes: int) -> None:
    owned = sorted(c for part in partition for c in part)
    require(owned == list(range(num_classes)), f"method.partition={partition} must give every class "
                                               f"0..{num_classes - 1} to exactly one student")
    require(all(partition), f"method.partition={partition} has a student with no classes")


class RoutedDenoiser(nn.Module):
    """Per-student critics (MSD): each sample goes to the denoiser of the student that owns its class."""

    def __init__(self, nets: list[nn.Module], route: Tensor):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.register_buffer("route", route, persistent=False)

    def forward(self, x: Tensor, sigma: Tensor, cond) -> Tensor:
        sigma = sigma.expand(len(x)) if sigma.ndim == 0 else sigma
        return routed(self.route[cond.labels], len(self.nets),
                      lambda k, idx: self.nets[k](x[idx], sigma[idx], cond.index(idx)))

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return self.nets[0].loss_weight(sigma)

    def noise_scale(self, sigma) -> Tensor:  # every critic is a copy of one teacher: they share its noise states
        return self.nets[0].noise_scale(sigma)


class ClassBatches:
    """MSD's batches (Song et al. 2024 train each student on its own classes): `size` real images of every student's
    classes per micro-batch, K x size in all, drawn with the run's (checkpointed) random state."""

    def __init__(self, data, partition: list[list[int]]):
        self.images, self.labels = data.images, data.labels
        self.pools = [torch.isin(data.labels, torch.tensor(part)).nonzero()[:, 0] for part in partition]

    def next(self, size: int, device) -> Batch:
        idx = torch.cat([pool[torch.randint(0, len(pool), (size,))] for pool in self.pools])
        return Batch.of(self.images[idx].to(device), self.labels[idx].to(device))


@register("msd")
class MSD(DMD2):
    """Song et al. 2024 (MSD): K students, each distilled with DMD2 on its classes; smaller ones start from TSM."""

    Config = MSDConfig

    def __init__(self, config: MSDConfig, teacher=None, data=None):
        require(teacher is not None and teacher.num_classes > 0, "msd needs a class-conditional teacher")
        partition = config.partition or contiguous_partition(teacher.num_classes, config.students)
        require(config.students <= teacher.num_classes,
                f"method.students={config.students} is more than the teacher's {teacher.num_classes} classes")
        check_partition(partition, teacher.num_classes)
        super().__init__(config, teacher, data)
        self.partition, self.data = partition, data
        bare = [k for k, part in enumerate(partition) if not torch.isin(data.labels, torch.tensor(part)).any()] \
            if data is not None and config.batches == "per_student" else []
        require(not bare, f"msd: student {bare[:1]}'s classes have no images in the data (a DiT's class folders are "
                          f"its ImageNet ids): give every student's classes images, or method.batches=split")
        self.teacher_denoiser = teacher.denoiser
        route = torch.zeros(class_embeddings(teacher.num_classes), dtype=torch.long)  # the null label: student 0
        for k, classes in enumerate(partition):
            route[classes] = k
        self.register_buffer("route", route, persistent=False)
        make = (lambda: smaller_unet(teacher.unet, config.student_width)) if config.student_width < 1 \
            else (lambda: trainable_copy(teacher.unet, "student", config))
        self.student = nn.ModuleList(self.student_of(make()) for _ in partition)
        self.smaller = config.student_width < 1
        self.gan_start = (config.tsm_steps if self.smaller else 0) + config.dm_steps
        if config.critics == "per_student":  # each student's fake score and GAN head see only its classes
            self.fake_score = RoutedDenoiser([teacher.denoiser.like(trainable_copy(teacher.unet, "fake_score", config))
                                              for _ in partition],
                                             route)
            self.head = nn.ModuleList(DiscriminatorHead(self.tap.channels, config.head_width) for _ in partition)

    def phases(self) -> list[Phase]:
        c = self.config
        batches = (lambda: ClassBatches(self.data, self.partition)) if c.batches == "per_student" else None
        phases = self.dmd_phases(start=c.tsm_steps if self.smaller else 0, batches=batches)
        if self.smaller and c.tsm_steps:
            phases.insert(0, Phase("tsm", ("student",), loss=self.tsm_loss, lr=c.lr_tsm, stop=c.tsm_steps,
                                   grad_clip=c.grad_clip, batches=batches))
        return phases

    def micro_batch(self, size: int) -> int:
        return size * len(self.partition) if self.config.batches == "per_student" else size

    def build_student(self, teacher) -> nn.Module:
        return nn.ModuleList()  # the K students are built once the partition is known, after DMD2's critics

    def on_start(self, context: RunContext) -> None:
        """The run's step budget must leave room for each of the stages."""
        steps = context.steps
        require(not self.smaller or self.config.tsm_steps < steps,
                f"method.tsm_steps={self.config.tsm_steps} leaves no distillation in trainer.steps={steps}: "
                f"use fewer TSM steps or more steps (presets quick-small, full-small)")
        require(not self.config.dm_steps or self.gan_start < steps,
                f"method.dm_steps={self.config.dm_steps} leaves no adversarial stage in trainer.steps={steps}")

    def gan_active(self, step: int) -> bool:
        """The three stages of MSD's smaller students: TSM, distribution matching, then DM with the GAN."""
        return self.config.gan and step >= self.gan_start

    def critic_logits(self, x_t: Tensor, sigma: Tensor, cond) -> Tensor:
        if self.config.critics == "shared":
            return super().critic_logits(x_t, sigma, cond)

        def one(k, idx):
            return self.head[k](bottleneck(self.fake_score.nets[k], x_t[idx], sigma[idx], cond.index(idx), self.tap))

        return routed(self.route[cond.labels], len(self.student), one)

    def per_student(self, fn, labels: Tensor) -> Tensor:
        """Apply fn(student, idx) per student on the samples whose labels it owns, reassembled in batch order."""
        return routed(self.route[labels], len(self.student), lambda k, idx: fn(self.student[k], idx))

    def generate(self, labels: Tensor) -> Tensor:
        return self.per_student(lambda student, idx: self.generate_with(student, self.cond(labels[idx]), len(idx)),
                                labels)

    def tsm_loss(self, batch: Batch, step: int):
        """MSD (Song et al. 2024), teacher score matching: each smaller student regressed onto the teacher's x0 by
        denoising score matching on its classes' real images."""
        real, labels = batch.images, batch.labels
        t = sample_timesteps(len(real), self.T, device=real.device)
        sigma = self.teacher_denoiser.t_to_sigma(t).to(real.device)
        loss = dsm_loss(self.routed_students, real, sigma, labels, teacher=self.teacher_denoiser)
        return loss, {"tsm": loss.item()}

    def routed_students(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        """The students as one denoiser: each sample denoised by the student that owns its label."""
        return self.per_student(lambda student, idx: student(x[idx], sigma[idx], labels[idx]), labels)

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        from dstudio.samplers import sample_multistep

        s = self.student_sigmas
        x = self._noise(len(labels), generator)
        x0 = self.per_student(lambda st, idx: sample_multistep(st, x[idx], s, self.cond(labels[idx]),
                                                               generator=generator), labels)
        return self._teacher.decode(x0).clamp(-1, 1)

    def exported_unet(self):
        from dstudio.distill.core.lora import fused_unet

        nets = [fused_unet(d.model) for d in self.student]
        first = nets[0].config
        routed = RoutedUNet2DModel(partition=self.partition,
                                   student_configs=[{k: v for k, v in dict(n.config).items() if not k.startswith("_")}
                                                    for n in nets],
                                   sample_size=first.sample_size, in_channels=first.in_channels,
                                   out_channels=first.get("out_channels"), student_class=type(nets[0]).__name__,
                                   num_class_embeds=class_embeddings(self.num_classes))
        for target, net in zip(routed.students, nets):
            target.load_state_dict(net.state_dict())
        return routed
