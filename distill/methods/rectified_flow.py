"""Rectified flow (Liu et al. 2023) with the RF++ improvements (Lee et al. 2024); InstaFlow on text teachers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dstudio.distill.core.config import require
from dstudio.distill.core.method import Phase, register
from dstudio.distill.core.reflow import FlowConfig, FlowMethod
from dstudio.distill.core.score import trainable_copy


@dataclass
class RectifiedFlowConfig(FlowConfig):
    init: Literal["teacher", "scratch"] = "teacher"  # RF++'s diffusion initialisation, or a fresh network

    def validate(self) -> None:
        super().validate()
        require(self.init in ("teacher", "scratch"), f"method.init={self.init!r} is not one of 'teacher', 'scratch'")


@register("rectified_flow", "rf", "instaflow")
class RectifiedFlow(FlowMethod):
    """2-rectified flow on the teacher's ODE pairs, then one-step distillation (InstaFlow on text teachers)."""

    Config = RectifiedFlowConfig
    text_teachers = True

    def __init__(self, config: RectifiedFlowConfig, teacher=None, data=None):
        super().__init__(config, teacher, data)
        net = trainable_copy(teacher.unet)
        if config.init == "scratch":
            net = type(net).from_config(net.config)
        self.student = teacher.denoiser.like(net)

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase("reflow", ("student",), lr=c.lr, betas=c.betas, grad_clip=c.grad_clip, stop=c.reflow_steps),
                Phase("distill", ("student",), lr=c.lr_distill, betas=c.betas, grad_clip=c.grad_clip,
                      start=c.reflow_steps)]

    def loss(self, phase: str, batch, step: int):
        z, x1, cond = self.pair_batch(batch if isinstance(batch, int) else len(batch[0]))
        if phase == "reflow":
            return self.reflow_loss(self.student, z, x1, cond)
        return self.one_step_loss(self.student, z, x1, cond)
