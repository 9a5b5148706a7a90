"""Assembling a run, in one place: config -> run folder check -> teacher -> data -> method -> Trainer.

`prepare_run(RunRequest(...))` is what `dstudio teacher train` / `dstudio distill`, the benchmarks and the tests
call; the app's jobs run the CLI. Every check happens once and before anything heavy is loaded: the config
(presets, overrides, types), the output folder, and on --resume the checkpoint, which is read once and handed to
`Trainer.fit` through the Run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from dstudio.distill.core.checkpoint import RunStart, open_run_folder
from dstudio.distill.core.config import ConfigError, from_dict, load_preset, merge_overrides, to_dict
from dstudio.distill.core.errors import UserError
from dstudio.distill.core.io import check_writable
from dstudio.distill.core.method import Method, get_method
from dstudio.distill.core.trainer import Trainer, TrainerConfig


@dataclass
class RunRequest:
    """A run as a user asks for it (the CLI's flags, a benchmark's settings), before anything is checked."""

    method: str
    out: str | Path
    teacher: object = None           # a pipeline folder or hub id (None: the shipped teacher), or a loaded Teacher
    preset: str | None = "quick"     # a preset name or a YAML file; None: the method config's defaults
    data: object = None              # mnist, digits or an image folder (None: the preset's), or a LabelledImages
                                     # already in the teacher's model space
    overrides: Sequence[str] = ()    # "section.key=value", as --set
    options: dict = field(default_factory=dict)  # method config keys given by their own flags (--students 2)
    steps: int | None = None
    deterministic: bool = False
    resume: bool = False
    overwrite: bool = False


@dataclass
class Run:
    """An assembled run: its resolved config, teacher, data, method and Trainer, and its checked folder."""

    config: dict
    teacher: object
    data: object
    method: Method
    trainer: Trainer
    start: RunStart  # the folder (fresh, or --resume with its checkpoint read), checked once

    @property
    def out(self) -> Path:
        return self.start.run_dir

    def fit(self, export: bool = True) -> Path | None:
        """Train, checkpoint and export (the Trainer's fit, from the folder state checked here)."""
        return self.trainer.fit(export=export, start=self.start)


def _data_name(request: RunRequest) -> str | None:
    data = request.data
    return None if data is None else str(data) if isinstance(data, (str, Path)) else data.name


def resolve_config(request: RunRequest) -> tuple[type[Method], TrainerConfig, object, dict]:
    """The method class, its trainer and method configs and the resolved config (what config.yaml records),
    each value checked: presets, overrides, types and keys."""
    cls = get_method(request.method)
    name = _data_name(request)
    if name is not None and not cls.needs_data:
        trains_on = cls.trains_on or "its own samples scored by the teacher (data-free)"
        raise UserError(f"--data does not apply to method '{cls.name}': it trains on {trains_on}, not on images")
    preset = load_preset(cls.name, request.preset, name or "mnist") if request.preset is not None else {}
    raw = merge_overrides(preset, list(request.overrides))
    unknown = set(raw) - {"trainer", "method"}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}: use trainer: and method:")
    trainer_raw = dict(raw.get("trainer") or {})
    if request.steps is not None:
        trainer_raw["steps"] = request.steps
    if request.deterministic:
        trainer_raw["deterministic"] = True
    tcfg = from_dict(TrainerConfig, trainer_raw, "trainer.")
    mraw = dict(raw.get("method") or {})
    if name is not None and "data" in cls.Config.__dataclass_fields__:
        mraw["data"] = name
    mcfg = from_dict(cls.Config, {**mraw, **request.options}, "method.")
    teacher = request.teacher
    source = teacher if teacher is None or isinstance(teacher, (str, Path)) else teacher.source
    resolved = {"method_name": cls.name, "preset": request.preset, "teacher": source,
                "trainer": to_dict(tcfg), "method": to_dict(mcfg)}
    return cls, tcfg, mcfg, resolved


def run_teacher(cls: type[Method], teacher):
    """The method's teacher: loaded from a folder or hub id (None: the shipped one), or the Teacher given."""
    from dstudio.distill.core.teacher import load_teacher

    if not cls.needs_teacher:
        return None
    return load_teacher(teacher) if teacher is None or isinstance(teacher, (str, Path)) else teacher


def run_data(cls: type[Method], mcfg, teacher, data):
    """The method's images in the teacher's model space: a named set or folder at the teacher's size (VAE latents
    for a latent teacher), or the LabelledImages given; None for a data-free method."""
    from dstudio.distill.data import load_data

    if not cls.needs_data:
        return None
    if data is not None and not isinstance(data, (str, Path)):
        return data
    channels, resolution = (teacher.pixel_shape[0], teacher.pixel_shape[-1]) if teacher else (1, mcfg.resolution)
    images = load_data(getattr(mcfg, "data", "mnist"), resolution, channels)
    return teacher.to_model_space(images) if teacher else images


def prepare_run(request: RunRequest) -> Run:
    """The one place a run is assembled: config, folder (and checkpoint) checks, teacher, data, method, Trainer."""
    cls, tcfg, mcfg, resolved = resolve_config(request)
    out = check_writable(request.out)
    start = open_run_folder(out, request.resume, request.overwrite, cls.name, resolved)  # before anything heavy
    teacher = run_teacher(cls, request.teacher)
    data = run_data(cls, mcfg, teacher, request.data)
    torch.manual_seed(tcfg.seed)
    method = cls(mcfg, teacher=teacher, data=data)
    trainer = Trainer(method, tcfg, out, data=data, resolved_config=resolved)
    return Run(resolved, teacher, data, method, trainer, start)
