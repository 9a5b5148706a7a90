"""The base of the rectified-flow methods (rectified flow / InstaFlow, SlimFlow): pairs, times, premetric, export.

Students keep their teacher's parameterisation and sampling clip (Teacher.student) and are read as flows through
FlowView, so a student initialised from the teacher starts exactly as the teacher's own probability-flow ODE, from
its `start_t` down; exports run with FlowEulerScheduler in the teacher's prediction type.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from dstudio.distill.core.config import require
from dstudio.distill.core.denoiser import FLOW_START_GAIN, StartOptions, append_dims
from dstudio.distill.core.flow import FlowView, sample_u_shaped, sample_uniform
from dstudio.distill.core.losses import TeacherFeatureDistance, lpips_distance, load_lpips, rfpp_premetric
from dstudio.distill.core.method import Distiller, Phase, PromptOptions, RunContext
from dstudio.distill.core.pairs import SOLVERS, PairBatches, Pairs, PairStore, PairStoreError
from dstudio.distill.core.sharding import is_sharded
from dstudio.samplers import FlowEulerScheduler, sample_flow_euler, scheduler_from_teacher


@dataclass
class FlowConfig(StartOptions, PromptOptions):
    pairs: str | None = field(default=None, metadata={  # runs with equal settings can share one store
        "cli": "--pairs", "help": "reflow pair store folder (default: RUN/pairs)"})
    start_gain: float = FLOW_START_GAIN  # where an eps teacher's flow student starts (denoiser.FLOW_START_GAIN)
    num_pairs: int = 5000
    shard_size: int = 500
    pair_seed: int = 0
    solver: str = "dpmpp"             # the teacher ODE's solver, one of pairs.SOLVERS
    solver_steps: int = 25
    guidance: float = 1.0             # CFG in the teacher's ODE (InstaFlow's text pairs use > 1)
    reflow_steps: int = 1000          # steps of the reflow phase; the remaining trainer steps distil to one step
    time_dist: Literal["u_shaped", "uniform"] = "u_shaped"
    u_shape_a: float = 4.0
    premetric: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    # the perceptual distance added to the premetric (RF++: LPIPS-Huber; SlimFlow: LPIPS): "lpips" when the lpips
    # package and its VGG weights load (else none), "teacher" the frozen teacher's own features (offline,
    # losses.TeacherFeatureDistance), "auto" LPIPS when it loads else the teacher's features, "none"
    perceptual: Literal["auto", "lpips", "teacher", "none"] = "auto"
    lr: float = 2e-5
    lr_distill: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    export_steps: int = 1             # the exported pipeline's default number of Euler steps

    def validate(self) -> None:
        require(self.num_pairs > 0 and self.shard_size > 0,
                f"method.num_pairs={self.num_pairs} and method.shard_size={self.shard_size} must be > 0")
        require(self.solver_steps > 0, f"method.solver_steps={self.solver_steps} must be > 0")
        require(self.solver in SOLVERS, f"method.solver={self.solver!r} is not one of {', '.join(map(repr, SOLVERS))}")
        require(self.reflow_steps >= 0, f"method.reflow_steps={self.reflow_steps} must be >= 0")
        require(self.lr > 0 and self.lr_distill > 0,
                f"method.lr={self.lr} and method.lr_distill={self.lr_distill} must be > 0")
        require(self.u_shape_a > 0, f"method.u_shape_a={self.u_shape_a} must be > 0")
        require(self.guidance >= 0, f"method.guidance={self.guidance} must be >= 0")
        require(self.export_steps >= 1, f"method.export_steps={self.export_steps} must be >= 1")


def flow_solve(denoiser, z: Tensor, cond, steps: int) -> Tensor:
    """x1 from unit noise z by `steps` Euler steps of a denoiser read as a flow (the exported sampler's path)."""
    view = FlowView(denoiser)
    return sample_flow_euler(view, z, view.euler_times(steps), cond)


class FlowMethod(Distiller):
    """Shared machinery and the two phases (reflow, then one-step distillation), both trained on pairs the Trainer
    streams; subclasses build `self.student` (a Denoiser) and define `reflow_objective` and `distill_objective`."""

    Config = FlowConfig
    needs_data = False  # the pairs are the data
    trains_on = "pairs (noise, sample) from its teacher's ODE (--pairs folder)"

    def __init__(self, config: FlowConfig, teacher=None, data=None):
        super().__init__(config, teacher, data)
        self.teacher_denoiser = teacher.denoiser  # a frozen submodule: moves to the device with the method
        if config.pairs and Path(config.pairs).exists() and not Path(config.pairs).is_dir():
            raise PairStoreError(f"pair store '{config.pairs}' is a file: give a folder (it is created if missing)")
        self.pairs: dict[str, Tensor | None] | None = None  # the teacher's pairs, filled when the run starts
        self._lpips = self._teacher_features = None

    # --- phases -----------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        c = self.config
        common = dict(betas=c.betas, grad_clip=c.grad_clip)
        return [Phase("reflow", ("student",), loss=self.reflow_objective, lr=c.lr, stop=c.reflow_steps,
                      batches=self.teacher_pairs, **common),
                Phase("distill", ("student",), loss=self.distill_objective, lr=c.lr_distill, start=c.reflow_steps,
                      batches=self.distill_pairs, **common)]

    def reflow_objective(self, pairs: Pairs, step: int) -> tuple[Tensor, dict[str, float]]:
        """The reflow phase's loss on a micro-batch of the teacher's pairs."""
        raise NotImplementedError

    def distill_objective(self, pairs: Pairs, step: int) -> tuple[Tensor, dict[str, float]]:
        """The distillation phase's loss on a micro-batch of `distill_pairs()`."""
        raise NotImplementedError

    # --- pairs ------------------------------------------------------------------------------------
    def pair_spec(self) -> dict:
        c = self.config
        spec = {"teacher": self.source, "solver": c.solver, "solver_steps": c.solver_steps, "guidance": c.guidance,
                "num_pairs": c.num_pairs, "shard_size": c.shard_size, "seed": c.pair_seed, "shape": list(self.shape)}
        if self.prompts is not None:  # the store keeps each pair's prompt id, not its embedding
            spec["prompts_sha1"] = hashlib.sha1("\n".join(self.prompts).encode()).hexdigest()
            spec["conditions"] = "ids"
        return spec

    def cond_for(self, idx: Tensor) -> Tensor | None:
        """Pair i's condition id: class i mod classes (balanced), or prompt i mod prompts; None without a table."""
        rows = self.conditions.rows
        return idx % rows if rows else None

    def on_start(self, context: RunContext) -> None:
        """Fill the teacher's pair store (RUN/pairs or method.pairs) before the first step; load the perceptual
        distance."""
        root = Path(self.config.pairs) if self.config.pairs else context.run_dir / "pairs"
        self.pairs = self.filled_store(PairStore(root, self.pair_spec()))
        kind = self.config.perceptual
        if kind in ("auto", "lpips") and self._lpips is None:
            self._lpips = load_lpips(context.accelerator.device, quiet=kind == "auto")
        if kind == "teacher" or (kind == "auto" and self._lpips is None):
            self._teacher_features = TeacherFeatureDistance(self.teacher_denoiser, self._teacher.feature_taps)

    def filled_store(self, store: PairStore, solve=None) -> dict[str, Tensor | None]:
        """Open `store` (the main process creates it), generate its missing shards on every process, load it."""
        acc = self.context.accelerator
        if acc.is_main_process:  # creates the store; the others then only check it
            store.open()
        acc.wait_for_everyone()
        if not acc.is_main_process:
            store.open()
        # trainer.strategy=fsdp: every teacher call is collective, so every process runs every shard (same noise,
        # same files); data parallel: shard i on rank i mod N
        sharded = is_sharded(next(self._teacher.network.parameters()))
        rank, world = (0, 1) if sharded else (acc.process_index, acc.num_processes)
        store.generate(self._teacher, self.cond_for, rank=rank, world=world, progress=acc.is_main_process,
                       solve=solve, condition=self.cond)
        acc.wait_for_everyone()
        return store.load()

    def teacher_pairs(self) -> PairBatches:
        """The teacher's pairs (filled when the run started) as a batch source."""
        if self.pairs is None:
            raise RuntimeError("the teacher's pairs are made when the method is bound to a run (Trainer.begin)")
        return PairBatches(self.pairs, self.cond)

    def distill_pairs(self) -> PairBatches:
        """The distillation phase's batch source, opened at its first step: the teacher's pairs by default."""
        return self.teacher_pairs()

    def student_pairs(self, name: str) -> dict[str, Tensor | None]:
        """Pairs from the averaged student's own flow (Euler, solver_steps steps) on fresh noise, stored in RUN/name:
        Liu et al. 2023 distil k-rectified flow on pairs k-RF generates (gnobitab/RectifiedFlow, README).
        A store this run already completed is loaded as it is (on --resume, the weights have moved on)."""
        c = self.config
        spec = {**self.pair_spec(), "source": f"{self.name} student (EMA) after {c.reflow_steps} reflow steps",
                "solver": "euler", "seed": c.pair_seed + 1}

        @torch.no_grad()
        def solve(z, cond):
            with self.averaged_student() as net:
                return flow_solve(net, z, cond, c.solver_steps)

        return self.filled_store(PairStore(self.context.run_dir / name, spec), solve)

    # --- losses -----------------------------------------------------------------------------------
    def sample_t(self, view: FlowView, n: int, device) -> Tensor:
        """Reflow times, at most the student's least noisy one. Below its noisiest (`t_min` > 0 for a student that
        starts at a finite level, e.g. an eps teacher's) they are kept: x_t is then read at t_min as the sampler reads
        its start, so the states its first Euler step sees (pure noise at t = 0) are trained."""
        c = self.config
        t = sample_u_shaped(n, c.u_shape_a, device) if c.time_dist == "u_shaped" else sample_uniform(n, device=device)
        return t.clamp(max=view.t_max)

    def premetric(self, x_hat: Tensor, x: Tensor, kind: str | None = None) -> Tensor:
        """Per-sample distance between velocities or images: RF++'s pseudo-Huber, or the mean squared error."""
        if (kind or self.config.premetric) == "pseudo_huber":
            return rfpp_premetric(x_hat, x)
        return (x_hat - x).pow(2).flatten(1).mean(1)

    def perceptual(self, x1_hat: Tensor, x1: Tensor, cond) -> Tensor | None:
        """The perceptual distance between the student's samples and their targets, per sample (None: none)."""
        if self._lpips is not None:
            decode = self._teacher.decode
            return lpips_distance(self._lpips, decode(x1_hat), decode(x1))
        return None if self._teacher_features is None else self._teacher_features(x1_hat, x1, cond)

    def reflow_loss(self, student, z: Tensor, x1: Tensor, cond, premetric: str | None = None,
                    perceptual: bool = True) -> tuple[Tensor, dict[str, float]]:
        """Liu et al. 2023 (rectified flow), eq. 2 on fixed pairs, with RF++'s times and premetric (Lee et al. 2024,
        sec. 4): d(v_hat(x_t, t), x1 - z), x_t = t x1 + (1 - t) z; with LPIPS, t d + LPIPS(x1_hat, x1)."""
        view = FlowView(student)
        t = self.sample_t(view, len(z), z.device)
        tt = append_dims(t.to(z.dtype), z.ndim)
        x_t = tt * x1 + (1 - tt) * z
        x1_hat = view.x1_hat(x_t, t, cond)
        v_hat = (x1_hat - x_t) / (1 - tt)
        dist = self.premetric(v_hat, x1 - z, premetric)
        lp = self.perceptual(x1_hat, x1, cond) if perceptual else None
        if lp is None:
            loss = dist.mean()
            return loss, {"reflow": loss.item()}
        loss = (t.to(dist.dtype) * dist + lp).mean()
        return loss, {"reflow": dist.mean().item(), "perceptual": lp.mean().item()}

    def one_step_loss(self, student, z: Tensor, target: Tensor, cond) -> tuple[Tensor, dict[str, float]]:
        """Liu et al. 2023, sec. 2.3 (distillation, t = eps): d(z + v(z, eps), x1) (+ LPIPS when available)."""
        x1_hat = FlowView(student).one_step(z, cond)
        dist = self.premetric(x1_hat, target)
        lp = self.perceptual(x1_hat, target, cond)
        loss = dist.mean() if lp is None else (dist + lp).mean()
        logs = {"distill": dist.mean().item()}
        if lp is not None:
            logs["perceptual"] = lp.mean().item()
        return loss, logs

    # --- sampling and export ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator, steps: int | None = None) -> Tensor:
        z = torch.randn((len(labels), *self.shape), generator=generator, device=labels.device)
        x1 = flow_solve(self.student_net(), z, self.cond(labels), steps or self.config.export_steps)
        return self._teacher.decode(x1).clamp(-1, 1)

    def export(self, path) -> None:
        sched = scheduler_from_teacher(FlowEulerScheduler, self.teacher_scheduler,
                                       num_inference_steps=self.config.export_steps,
                                       prediction_type=self.student_net().prediction_type,
                                       sigma_max=self.student_net().sigma_max)
        info = {"method": self.name, "teacher": self.source, "pairs": self.pair_spec()}
        self._teacher.export(self.student_net().model, sched, path, **info)
