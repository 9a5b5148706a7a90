"""The Method base: a method owns its networks, declares its update phases and computes their losses.

Methods register themselves with `@register("name")` and are found by `discover()`: every module of
distill/methods (and of any package named by a `dstudio.methods` entry point or $DSTUDIO_METHODS), so a new
method is one new file. The CLI, the app, the benchmarks and the tests read the registry.
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.metadata
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from dstudio.distill.core.conditioning import Conditioning, ConditionTable
from dstudio.distill.core.config import ConfigError, require
from dstudio.distill.core.errors import UserError, one_line

GRID_CLASSES = 10  # the most classes a sample grid shows (DiT has 1,000)


class BatchSource(Protocol):
    """Where a phase draws its micro-batches from when they are not the run's data (e.g. reflow pairs)."""

    def next(self, size: int, device) -> Any:
        """One micro-batch of `size` examples on `device`."""


Loss = Callable[[Any, int], "tuple[Tensor, dict[str, float]]"]  # (micro-batch, step) -> (loss, logged terms)


@dataclass(frozen=True)
class Phase:
    """One update: the submodules it trains, its loss, how often it runs and its optimiser settings.

    `loss(batch, step)` is called by the Trainer on each micro-batch of the phase's steps; `batches`, when given,
    opens the phase's own batch source (called once, at the phase's first step in a run or a resume), which then
    replaces the run's data batches for this phase."""

    name: str
    modules: tuple[str, ...]
    loss: Loss
    lr: float
    every: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    start: int = 0
    stop: int | None = None
    batches: Callable[[], BatchSource] | None = None

    def active(self, step: int) -> bool:
        """Runs on steps start, start + every, ... before stop."""
        inside = self.start <= step and (self.stop is None or step < self.stop)
        return inside and (step - self.start) % self.every == 0

    def lr_at(self, step: int, warmup_steps: int = 0) -> float:
        """The learning rate at `step`: linear warm-up over the first `warmup_steps` steps of the phase, then lr."""
        if warmup_steps <= 0:
            return self.lr
        return self.lr * min(1.0, (step - self.start + 1) / warmup_steps)


class Batch(NamedTuple):
    """One micro-batch: images and labels for methods that train on data (None for data-free ones) and its size."""

    images: Tensor | None
    labels: Tensor | None
    size: int

    @classmethod
    def of(cls, images: Tensor, labels: Tensor) -> "Batch":
        return cls(images, labels, len(images))

    @classmethod
    def data_free(cls, size: int) -> "Batch":
        return cls(None, None, size)


@dataclass(frozen=True)
class RunContext:
    """What a method is given for one run, explicitly, before its first step (and again on --resume)."""

    run_dir: Path
    accelerator: Any = None  # accelerate's Accelerator: device, processes, wait_for_everyone
    steps: int = 0           # the run's step budget (trainer.steps)
    ema: Any = None          # the Trainer's EMA of student_net() (None: no averaging)


class Method(nn.Module, abc.ABC):
    """Base class. Subclasses set `name`, `Config` (a dataclass) and implement phases (each with its loss), sample
    and export."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    needs_teacher: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    is_distiller: ClassVar[bool] = True
    student_module: ClassVar[str] = "student"
    trains_on: ClassVar[str] = ""  # what it learns from, when not images (said when --data is given)
    num_classes: int = 0  # class labels of the sample grids (0: unconditional)
    context: RunContext | None = None  # the run it trains in, given by `bind`

    def __init__(self, config, teacher=None, data=None):
        super().__init__()
        self.config = config

    # --- what subclasses define -----------------------------------------------------------------
    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The update phases, in the order they run within a step; each carries its loss."""

    @abc.abstractmethod
    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Images in [-1, 1] from the student for the given class labels (for grids and FID)."""

    @abc.abstractmethod
    def export(self, path) -> None:
        """Write the student as a diffusers pipeline folder at `path`."""

    # --- optional hooks ---------------------------------------------------------------------------
    def on_start(self, context: RunContext) -> None:
        """Called once before training (and on --resume) with the run context: set-up that needs the run."""

    def on_phase_start(self, phase: Phase, step: int) -> None:
        """Called before a phase's first update (at its `start` step; not again when a resume comes after it)."""

    def activation_passes(self) -> dict[str, list[tuple[str, str]]]:
        """Per phase, the network passes whose activations it holds at once for backward, in call order: (module
        attribute, "full" or "tap": up to the GAN head's features[, the module attribute that reads them]);
        `dstudio plan` traces each. Default: one full pass of the student in every phase."""
        return {}

    def micro_batch(self, size: int) -> int:
        """The examples a phase's micro-batch holds for a per-process batch of `size` (`dstudio plan` reads it)."""
        return size

    def grid_classes(self) -> Tensor:
        """The class labels of the periodic sample grids (one row each; [0] when unconditional)."""
        return torch.arange(min(max(self.num_classes, 1), GRID_CLASSES))

    def checkpoint_modules(self) -> list[str]:
        """Submodules whose state a checkpoint keeps: the trained ones, plus any a method adds (a frozen guide)."""
        return self.trainable_modules()

    # --- shared machinery -------------------------------------------------------------------------
    def bind(self, context: RunContext) -> None:
        """Give the method its run (the Trainer does, before the first step and on --resume), then `on_start`."""
        self.context = context
        self.on_start(context)

    def phase(self, name: str) -> Phase:
        """The phase called `name`."""
        phases = self.phases()
        for p in phases:
            if p.name == name:
                return p
        raise ValueError(f"method '{self.name}' has no phase '{name}' (its phases: {', '.join(p.name for p in phases)})")

    def forward(self, phase: str, batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Phase `phase`'s loss on one micro-batch: the Trainer calls it through the (data-parallel) model."""
        return self.phase(phase).loss(batch, step)

    def student_net(self) -> nn.Module:
        """The network that is averaged (EMA) and exported: the attribute named by `student_module`."""
        return getattr(self, self.student_module)

    @contextlib.contextmanager
    def averaged_student(self):
        """The student with its run's EMA weights swapped in for the block (its live weights without an EMA)."""
        ema = self.context.ema if self.context else None
        if ema is None:
            yield self.student_net()
        else:
            with ema.applied(self.student_net()) as net:
                yield net

    def phase_parameters(self, phase: Phase) -> list[nn.Parameter]:
        params, seen = [], set()
        for name in phase.modules:
            for p in getattr(self, name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def param_groups(self, phase: Phase) -> list[dict]:
        """The phase's parameters as optimiser groups, one per learning-rate scale (`lr_scale`, e.g. LoRA+'s B)."""
        scales: dict[int, float] = {}
        for name in phase.modules:
            module = getattr(self, name)
            for m in module.modules():
                if hasattr(m, "lr_scales"):
                    scales.update(m.lr_scales())
        groups: dict[float, list] = {}
        for p in self.phase_parameters(phase):
            groups.setdefault(scales.get(id(p), 1.0), []).append(p)
        return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]

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


@dataclass
class PromptOptions:
    """The method-config key of data-free methods on text-to-image teachers (`--prompts FILE`)."""

    prompts: str | None = field(default=None, metadata={
        "cli": "--prompts", "help": "text-to-image teachers: a file with one prompt per line"})


def read_prompts(path: str | None) -> list[str]:
    """The prompts of a file, one a line (blank lines skipped)."""
    if path is None:
        raise UserError("a text-to-image teacher needs prompts: give --prompts FILE (one prompt per line)")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts file '{path}' does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file '{path}' has no prompts (one prompt per line)")
    return prompts


class Distiller(Method):
    """A method that learns from a teacher: it keeps the teacher and what every distiller reads from it, and its
    table of conditions (the teacher's class labels, or the prompts: the data's captions or --prompts), which a
    batch's ids index."""

    def __init__(self, config, teacher=None, data=None):
        super().__init__(config)
        require(teacher is not None, f"{self.name} needs a teacher")
        self._teacher = teacher  # not a submodule: the frozen networks a method trains against it registers itself
        self.num_classes, self.shape = teacher.num_classes, teacher.sample_shape
        self.source, self.teacher_scheduler = teacher.source, teacher.family.fixed_scheduler()
        self.prompts = self.prompts_of(config, data) if teacher.takes_prompts else None
        self.conditions = ConditionTable(teacher.conditions(self.prompts))
        self._grid = data.labels.unique()[:GRID_CLASSES] if data is not None and self.num_classes else None

    def prompts_of(self, config, data) -> list[str]:
        """A text-to-image teacher's prompts: the captions of the data, else the prompts file."""
        if data is not None:
            require(bool(data.captions), f"{self.name} on text-to-image teacher '{self.source}' needs a captioned "
                                         f"image folder: --data FOLDER with metadata.jsonl")
            return list(data.captions)
        if not hasattr(config, "prompts"):
            raise UserError(f"method '{self.name}' does not take prompts, which text-to-image teacher '{self.source}' "
                            f"needs")
        return read_prompts(config.prompts)

    def cond(self, ids: Tensor | None) -> Conditioning:
        """The denoisers' condition for a batch's ids: class labels, rows of the prompt table, or the empty one."""
        return self.conditions(ids)

    def random_cond(self, n: int, device) -> Conditioning:
        """n conditions drawn uniformly from the table (data-free methods); the empty one without a table."""
        rows = self.conditions.rows
        return self.cond(torch.randint(0, rows, (n,), device=device)) if rows else Conditioning()

    def grid_classes(self) -> Tensor:
        """The data's classes (at most GRID_CLASSES), else the first classes of the teacher."""
        return self._grid.cpu() if self._grid is not None else super().grid_classes()

    @property
    def start_gain(self) -> float:
        """`method.start_gain` of a config with StartOptions: students start where their x0 gain is at most it."""
        from dstudio.distill.core.denoiser import MAX_START_GAIN

        gain = getattr(self.config, "start_gain", MAX_START_GAIN)
        require(gain > 0, f"method.start_gain={gain} must be > 0")
        return gain

    def student_of(self, model: nn.Module):
        """`model` (a copy of the teacher's backbone, or a smaller one) as this method's student denoiser."""
        return self._teacher.student(model, self.start_gain)


METHODS: dict[str, type[Method]] = {}
ALIASES: dict[str, str] = {}
BUILTIN_METHODS = "dstudio.distill.methods"  # a package searched like any other: the core imports no method by name
ENTRY_POINT_GROUP = "dstudio.methods"         # third-party packages: an entry point naming a method module or package
ENV_VAR = "DSTUDIO_METHODS"                   # comma-separated module or package names, searched as well


def register(name: str, *aliases: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise RuntimeError(f"method '{name}' is registered twice")
        cls.name = name
        METHODS[name] = cls
        for a in aliases:
            ALIASES[a] = name
        return cls

    return deco


def _import_methods(name: str) -> None:
    """Import a module, or every module of a package whose name does not start with '_' (they register themselves)."""
    module = importlib.import_module(name)
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        if not info.name.startswith("_"):
            importlib.import_module(f"{name}.{info.name}")


def method_sources() -> list[str]:
    """Where methods are found: the built-in package, the `dstudio.methods` entry points, then $DSTUDIO_METHODS."""
    sources = [BUILTIN_METHODS]
    sources += [ep.module for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    sources += [s.strip() for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]
    return sources


BROKEN: dict[str, str] = {}  # plugin source -> its one-line import error, as the last discover() found it


def discover() -> dict[str, type[Method]]:
    """Every registered method, after importing every method module of every source (imports are cached). A plugin
    source that raises on import (any exception) is set aside in BROKEN with its one-line error and affects no other
    method; the built-in package failing is a bug in dstudio and raises."""
    BROKEN.clear()
    for source in method_sources():
        try:
            _import_methods(source)
        except (Exception, SystemExit) as e:
            if source == BUILTIN_METHODS:
                raise
            BROKEN[source] = one_line(e)
    return METHODS


def get_method(name: str) -> type[Method]:
    discover()
    name = ALIASES.get(name, name)
    if name not in METHODS:
        broken = "".join(f"; method plugin '{s}' did not import ({e})" for s, e in BROKEN.items())
        raise ConfigError(f"unknown method '{name}': use one of {', '.join(sorted(METHODS))}{broken}")
    return METHODS[name]
