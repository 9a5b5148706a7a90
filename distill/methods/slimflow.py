"""SlimFlow (Zhu et al. 2024): a small one-step student by annealing reflow, then flow-guided distillation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import append_dims
from dstudio.distill.core.flow import ANNEALING, FlowView, anneal_beta, anneal_noise, joint_hflip
from dstudio.distill.core.method import Phase, register
from dstudio.distill.methods._flow import FlowConfig, FlowMethod
from dstudio.distill.core.score import smaller_unet


@dataclass
class SlimFlowConfig(FlowConfig):
    student_width: float = field(default=0.5, metadata={"cli": "--student-width", "help": "channel multiplier of smaller students (0.5: about 1/4 of the parameters)"})
    anneal_steps: int | None = None          # K_warm of the beta schedule (default: half the reflow phase)
    annealing: Literal["linear", "exp", "cos"] = "linear"
    hflip: bool = True                       # joint horizontal flip of (x1, z'); off for data that is not symmetric
    guide_t: tuple[float, float] = (0.2, 0.8)
    time_dist: Literal["u_shaped", "uniform"] = "uniform"
    premetric: Literal["pseudo_huber", "l2"] = "pseudo_huber"   # of the distillation (with LPIPS when available)
    reflow_premetric: Literal["l2", "pseudo_huber"] = "l2"      # of annealing reflow: the reference's plain L2
    lr: float = 2e-4
    lr_distill: float = 2e-5

    def validate(self) -> None:
        super().validate()
        require(0 < self.student_width <= 1, f"method.student_width={self.student_width} must be in (0, 1]")
        require(self.anneal_steps is None or self.anneal_steps >= 0,
                f"method.anneal_steps={self.anneal_steps} must be >= 0")
        require(self.annealing in ANNEALING, f"method.annealing={self.annealing!r} is not one of {ANNEALING}")
        lo, hi = self.guide_t
        require(0 < lo < hi < 1, f"method.guide_t={list(self.guide_t)} must satisfy 0 < lo < hi < 1")


@register("slimflow")
class SlimFlow(FlowMethod):
    """Annealing reflow of a small student from scratch, then distillation guided by its frozen 2-RF copy."""

    Config = SlimFlowConfig

    def __init__(self, config: SlimFlowConfig, teacher=None, data=None):
        super().__init__(config, teacher, data)
        self.student = self.student_of(smaller_unet(teacher.unet, config.student_width))
        self.guide = self.student_of(smaller_unet(teacher.unet, config.student_width))
        self.guide.requires_grad_(False)

    def activation_passes(self):
        """Flow-guided distillation holds two student passes (the pair's and the guide's one step)."""
        return {"distill": [("student", "full"), ("student", "full")]}

    def checkpoint_modules(self) -> list[str]:
        return [*self.trainable_modules(), "guide"]

    def on_phase_start(self, phase: Phase, step: int) -> None:
        if phase.name == "distill":  # the reference loads the 2-RF checkpoint's EMA weights as the guide
            with self.averaged_student() as net:
                self.guide.load_state_dict(net.state_dict())

    def annealing_loss(self, z, x1, cond, step: int):
        """SlimFlow, annealing reflow: ||v(x_t, t) - (x1 - z')||^2, z' = sqrt(1 - beta_k^2) z_pair + beta_k eps,
        t ~ U[eps, 1], unweighted and without LPIPS (yuanzhi-zhu/SlimFlow keeps LPIPS for distillation)."""
        c = self.config
        k_warm = c.anneal_steps if c.anneal_steps is not None else c.reflow_steps // 2
        beta = anneal_beta(step, k_warm, c.annealing)
        z = anneal_noise(z, torch.randn_like(z), beta)
        if c.hflip:
            x1, z = joint_hflip(x1, z)
        loss, logs = self.reflow_loss(self.student, z, x1, cond, c.reflow_premetric, perceptual=False)
        return loss, {**logs, "beta": beta}

    def guided_loss(self, z, x1, cond):
        """SlimFlow, flow-guided distillation: d(z + v(z), x1_pair) + d(z~ + v(z~), x^1), where
        x_t' = z~ + t' v(z~) and x^1 = x_t' + (1 - t') v_guide(x_t', t'), t' ~ U[0.2, 0.8]."""
        pair_loss, logs = self.one_step_loss(self.student, z, x1, cond)
        z_new = torch.randn_like(z)
        lo, hi = self.config.guide_t
        t = lo + (hi - lo) * torch.rand(len(z), device=z.device, dtype=torch.float64)
        with torch.no_grad():
            tt = append_dims(t.to(z.dtype), z.ndim)
            x_t = (1 - tt) * z_new + tt * FlowView(self.student).one_step(z_new, cond)
            x1_guide = FlowView(self.guide).x1_hat(x_t, t, cond)
        guide_loss, _ = self.one_step_loss(self.student, z_new, x1_guide, cond)
        return pair_loss + guide_loss, {**logs, "guided": guide_loss.item()}

    def reflow_objective(self, pairs, step: int):
        """SlimFlow's annealing reflow on a micro-batch of the teacher's pairs."""
        return self.annealing_loss(*pairs, step)

    def distill_objective(self, pairs, step: int):
        """SlimFlow's flow-guided distillation on a micro-batch of the teacher's pairs."""
        return self.guided_loss(*pairs)
