"""The Method base: a method owns its networks, declares its update phases and computes their losses.

Methods register themselves with `@register("name")`; the CLI, the app and the tests read `METHODS`,
so a new method is one new file in distill/methods.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from dstudio.distill.core.config import ConfigError


@dataclass(frozen=True)
class Phase:
    """One update: the submodules it trains, how often it runs and its optimiser settings."""

    name: str
    modules: tuple[str, ...]
    lr: float
    every: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    start: int = 0
    stop: int | None = None

    def active(self, step: int) -> bool:
        """Runs on steps start, start + every, ... before stop."""
        inside = self.start <= step and (self.stop is None or step < self.stop)
        return inside and (step - self.start) % self.every == 0

    def lr_at(self, step: int, warmup_steps: int = 0) -> float:
        """The learning rate at `step`: linear warm-up over the first `warmup_steps` steps of the phase, then lr."""
        if warmup_steps <= 0:
            return self.lr
        return self.lr * min(1.0, (step - self.start + 1) / warmup_steps)


class Method(nn.Module, abc.ABC):
    """Base class. Subclasses set `name`, `Config` (a dataclass) and implement phases/loss/sample/export."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    needs_teacher: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    is_distiller: ClassVar[bool] = True
    text_teachers: ClassVar[bool] = False  # whether it distils text-to-image (latent) teachers
    student_module: ClassVar[str] = "student"
    trains_on: ClassVar[str] = ""  # what it learns from, when not images (said when --data is given)
    ema = None  # the Trainer's EMA of student_net(), set when a Trainer takes the method

    def __init__(self, config, teacher=None, data=None):
        super().__init__()
        self.config = config

    # --- what subclasses define -----------------------------------------------------------------
    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The update phases, in the order they run within a step."""

    @abc.abstractmethod
    def loss(self, phase: str, batch: tuple[Tensor, Tensor] | int, step: int) -> tuple[Tensor, dict[str, float]]:
        """(images, labels) for methods that need data, the batch size for data-free ones."""

    @abc.abstractmethod
    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Images in [-1, 1] from the student for the given class labels (for grids and FID)."""

    @abc.abstractmethod
    def export(self, path) -> None:
        """Write the student as a diffusers pipeline folder at `path`."""

    # --- optional hooks ---------------------------------------------------------------------------
    def prepare(self, run_dir, accelerator, steps: int) -> None:
        """Called once before training (and on --resume) with the run folder and the total number of steps."""

    def checkpoint_modules(self) -> list[str]:
        """Submodules whose state a checkpoint keeps: the trained ones, plus any a method adds (a frozen guide)."""
        return self.trainable_modules()

    # --- shared machinery -------------------------------------------------------------------------
    def forward(self, phase: str, batch, step: int):
        return self.loss(phase, batch, step)

    def student_net(self) -> nn.Module:
        """The network that is averaged (EMA) and exported: the attribute named by `student_module`."""
        return getattr(self, self.student_module)

    @contextlib.contextmanager
    def averaged_student(self):
        """The student with its EMA weights swapped in for the block (its live weights when no EMA is set)."""
        if self.ema is None:
            yield self.student_net()
        else:
            with self.ema.applied(self.student_net()) as net:
                yield net

    def phase_parameters(self, phase: Phase) -> list[nn.Parameter]:
        params, seen = [], set()
        for name in phase.modules:
            for p in getattr(self, name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def trainable_modules(self) -> list[str]:
        names = []
        for phase in self.phases():
            names += [m for m in phase.modules if m not in names]
        return names

    def train_only(self, phase: Phase) -> None:
        """Let gradients reach this phase's parameters and nothing else (frozen teachers stay frozen)."""
        self.requires_grad_(False)
        for p in self.phase_parameters(phase):
            p.requires_grad_(True)


METHODS: dict[str, type[Method]] = {}
ALIASES: dict[str, str] = {}


def register(name: str, *aliases: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise RuntimeError(f"method '{name}' is registered twice")
        cls.name = name
        METHODS[name] = cls
        for a in aliases:
            ALIASES[a] = name
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    import dstudio.distill.methods  # noqa: F401  (methods register themselves on import)

    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}': use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
