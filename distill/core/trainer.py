"""The one training loop for every method: phases, EMA, clipping, grids, atomic checkpoints, resume, export."""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from dstudio.distill.core.config import require, to_dict
from dstudio.distill.core.errors import UserError
from dstudio.distill.core.images import collapse_reason, save_grid
from dstudio.distill.core.io import append_line, atomic_path, drop_stale_temps, run_folder_lock, save_torch
from dstudio.distill.core.memory import cast_frozen, enable_gradient_checkpointing, frozen_dtype
from dstudio.distill.core.method import Batch, Method, Phase
from dstudio.distill.core.signals import Stopped, stop_requested, stop_signals

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # tensors and plain data only, loaded with weights_only=True
RUN_MARKERS = (CHECKPOINT, "pipeline")  # what makes a folder hold a run
RUN_OUTPUTS = (CHECKPOINT, "pipeline", "log.jsonl", "samples", "config.yaml", "eval.json")  # what --overwrite clears
# Config keys a --resume may change: run length, logging, learning rates. Any other difference changes the
# networks or what they learn, and is refused.
RESUMABLE_TRAINER_KEYS = {"steps", "batch_size", "grad_accum", "ema_decay", "log_every", "sample_every",
                          "checkpoint_every", "grid_per_class", "mixed_precision", "cpu", "deterministic",
                          "gradient_checkpointing"}
RESUMABLE_METHOD_KEYS = {"pairs"}


def resumable_key(section: str, key: str) -> bool:
    if section == "trainer":
        return key in RESUMABLE_TRAINER_KEYS
    return key in RESUMABLE_METHOD_KEYS or key == "lr" or key.startswith("lr_")


class RunExistsError(UserError):
    """A fresh run into a folder that holds a run."""


def check_run_folder(run_dir: str | Path, resume: bool, overwrite: bool, markers=RUN_MARKERS) -> None:
    """Refuse to silently reuse a run folder: a fresh run needs an empty one or --overwrite."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise UserError("give --resume (continue the run) or --overwrite (start over), not both")
    if not resume and not overwrite and any((run_dir / m).exists() for m in markers):
        raise RunExistsError(f"{run_dir} holds a run: --resume to continue, --overwrite to start over")


def clear_run(run_dir: Path, names=RUN_OUTPUTS) -> None:
    """--overwrite: remove a previous run's outputs (a pair store, a cache of teacher samples, is kept)."""
    for name in names:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@dataclass
class TrainerConfig:
    steps: int = 1000
    batch_size: int = 64             # per process and per micro-batch: global batch = batch_size x processes x grad_accum
    grad_accum: int = 1              # micro-batches whose gradients are summed before each optimiser step
    warmup_steps: int = 0            # linear learning-rate warm-up over each phase's first steps (0: none)
    seed: int = 0
    ema_decay: float = 0.999
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 500
    grid_per_class: int = 8
    cpu: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms: same seed + config -> same student, slower
    gradient_checkpointing: bool = False  # recompute the trained UNets' activations in backward (less memory)
    # the weights no phase trains (the teacher, a LoRA run's shared base): float32, or kept in bf16 / fp16
    # ("auto": mixed_precision's dtype when it is on)
    frozen_dtype: Literal["float32", "bf16", "fp16", "auto"] = "float32"

    def validate(self) -> None:
        require(self.steps > 0, f"trainer.steps={self.steps} must be > 0")
        require(self.batch_size > 0, f"trainer.batch_size={self.batch_size} must be > 0")
        require(self.grad_accum > 0, f"trainer.grad_accum={self.grad_accum} must be > 0")
        require(self.warmup_steps >= 0, f"trainer.warmup_steps={self.warmup_steps} must be >= 0")
        require(0 <= self.ema_decay < 1, f"trainer.ema_decay={self.ema_decay} must be in [0, 1)")
        for key in ("log_every", "sample_every", "checkpoint_every", "grid_per_class"):
            require(getattr(self, key) > 0, f"trainer.{key}={getattr(self, key)} must be > 0")
        require(self.frozen_dtype in ("float32", "auto") or self.mixed_precision != "no",
                f"trainer.frozen_dtype={self.frozen_dtype} needs trainer.mixed_precision=bf16 or fp16 (the float32 "
                f"trained weights meet the frozen ones under autocast)")


class DivergenceError(RuntimeError):
    """A non-finite loss: the run stops and keeps its last good checkpoint."""


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up min(decay, (1+k)/(10+k))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        params = [p.detach().to(s.dtype) for s, p in zip(self.shadow, module.parameters())]
        if params:
            torch._foreach_lerp_(self.shadow, params, 1 - d)

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Swap the averaged weights in for the duration of the block."""
        live = [p.detach().clone() for p in module.parameters()]
        with torch.no_grad():
            for s, p in zip(self.shadow, module.parameters()):
                p.copy_(s)
        try:
            yield module
        finally:
            with torch.no_grad():
                for v, p in zip(live, module.parameters()):
                    p.copy_(v)

    def state_dict(self) -> list[Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[Tensor]) -> None:
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)


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


def cpu_only() -> bool:
    """No accelerator here: tell accelerate, so that a multi-process launch on CPUs runs data-parallel (gloo)."""
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def _rng_state() -> dict:
    """Every generator's state as tensors and lists (nothing that needs unpickling code)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dstudio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dstudio")
    except PackageNotFoundError:
        return "unknown"


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state, loaded with weights_only=True: a file holding anything but tensors and plain data
    (a crafted pickle, an old-format checkpoint) is refused without running any of it."""
    if not path.is_file():
        raise UserError(f"--resume: no {CHECKPOINT} in '{path.parent}'; start without --resume")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint '{path}' is corrupt (not a torch zip file); --overwrite starts over")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip
        if "Weights only load failed" in str(e):
            raise UserError(f"checkpoint '{path}' holds objects other than tensors and plain data (an older "
                            f"dstudio's checkpoint, or a crafted file): refused without unpickling it; "
                            f"--overwrite starts over") from None
        raise UserError(f"checkpoint '{path}' is corrupt ({type(e).__name__}); --overwrite starts over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint '{path}' is not a dstudio checkpoint of format {CHECKPOINT_FORMAT} (an older "
                        f"dstudio's?); --overwrite starts over")
    return state


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{section.key: (old, new)} for every trainer/method value that differs between two resolved configs."""
    diff = {}
    for section in ("trainer", "method"):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diff[f"{section}.{key}"] = (a.get(key), b.get(key))
    return diff


def check_resume(state: dict, method_name: str, config: dict, run_dir: Path) -> dict[str, tuple]:
    """Refuse a resume by another method or with a config that changes what is trained; return the allowed
    changes (run length, logging, learning rates)."""
    made_by = state.get("method")
    if made_by != method_name:
        raise UserError(f"run '{run_dir}' was made by method '{made_by}', not '{method_name}': resume it with "
                        f"{made_by}, or use another --out (--overwrite starts over)")
    diff = config_changes(json.loads(state["config"]), json.loads(json.dumps(config)))  # tuples as lists
    refused = [k for k in diff if not resumable_key(*k.split(".", 1))]
    if refused:
        detail = ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in refused)
        raise UserError(f"--resume with a config that changes what run '{run_dir}' trains: {detail}; resume with "
                        f"its config.yaml values, or --overwrite to start over")
    return diff


class Trainer:
    """Runs a Method's phases for `config.steps` steps in `run_dir` and exports its student."""

    def __init__(self, method: Method, config: TrainerConfig, run_dir: str | Path, data=None,
                 resolved_config: dict | None = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.benchmark = False
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        # Phases train different parameters, so every DDP step leaves some of them unused.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu or cpu_only(),
                                       kwargs_handlers=[ddp])
        self.method = method.to(self.accelerator.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(method)
        dtype = frozen_dtype(config.frozen_dtype, config.mixed_precision)
        self.frozen_cast = dtype is not None and cast_frozen(method, dtype) > 0  # then grids sample under autocast
        self.phases = method.phases()
        # foreach: one kernel per op over all tensors, on CPUs too (torch picks it by default on CUDA only)
        optimizers = [torch.optim.AdamW(method.param_groups(ph), lr=ph.lr, betas=ph.betas,
                                        weight_decay=ph.weight_decay, foreach=True) for ph in self.phases]
        # `model` is what runs the losses (DDP-wrapped on many processes); `method` stays the plain module.
        self.model, *optimizers = self.accelerator.prepare(self.method, *optimizers)
        self.optimizers = {ph.name: opt for ph, opt in zip(self.phases, optimizers)}
        self.ema = method.ema = EMA(method.student_net(), config.ema_decay)
        self.stream = None
        if method.needs_data:
            require(data is not None, f"method {method.name} needs a data set")
            self.stream = BatchStream(data, config.batch_size, config.seed,
                                      self.accelerator.process_index, self.accelerator.num_processes)
        self.step = 0
        self.collapse_warnings: list[str] = []  # what the periodic sample check found, for the final report
        self.resolved_config = resolved_config or {"trainer": to_dict(config), "method": to_dict(method.config)}

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.method.name,
            "dstudio": dstudio_version(),
            "step": self.step,
            "modules": {n: getattr(self.method, n).state_dict() for n in self.method.checkpoint_modules()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "ema": self.ema.state_dict(),
            "stream": self.stream.state_dict() if self.stream else None,
            "rng": _rng_state(),
            "config": json.dumps(self.resolved_config),
        }

    def save_checkpoint(self) -> None:
        if self.is_main:
            save_torch(self.state_dict(), self.run_dir / CHECKPOINT)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self) -> None:
        """Check the run folder's checkpoint against this run, then restore it."""
        self._restore(self._read_checked_checkpoint())

    def _read_checked_checkpoint(self) -> dict:
        state = read_checkpoint(self.run_dir / CHECKPOINT)
        changes = check_resume(state, self.method.name, self.resolved_config, self.run_dir)
        if changes and self.is_main:
            print("dstudio: resuming with " + ", ".join(f"{k}={new!r} (was {old!r})"
                                                        for k, (old, new) in changes.items()), file=sys.stderr)
        return state

    def _restore(self, state: dict) -> None:
        try:
            for name, sd in state["modules"].items():
                getattr(self.method, name).load_state_dict(sd)
            for name, sd in state["optimizers"].items():
                self.optimizers[name].load_state_dict(sd)
        except (RuntimeError, KeyError, AttributeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint '{self.run_dir / CHECKPOINT}' does not fit this run's networks ({first}); "
                            f"was the teacher changed? --overwrite starts over") from None
        for phase in self.phases:  # a resume may change learning rates: the phase's own settings win
            for group in self.optimizers[phase.name].param_groups:
                group.update(lr=phase.lr * group.get("lr_scale", 1.0), betas=phase.betas,
                             weight_decay=phase.weight_decay)
        self.ema.load_state_dict(state["ema"])
        if self.stream and state["stream"]:
            self.stream.load_state_dict(state["stream"])
        _set_rng_state(state["rng"])
        self.step = state["step"]

    # --- the loop ---------------------------------------------------------------------------------
    def _run_phase(self, phase: Phase, batches: list) -> dict[str, float]:
        self.method.train_only(phase)
        opt = self.optimizers[phase.name]
        totals: dict[str, float] = {}
        for i, batch in enumerate(batches):
            # gradients of all but the last micro-batch stay local: DDP all-reduces once, at the last backward
            sync = contextlib.nullcontext() if i == len(batches) - 1 else self.accelerator.no_sync(self.model)
            with sync:
                with self.accelerator.autocast():
                    loss, logs = self.model(phase.name, batch, self.step)
                if not torch.isfinite(loss):
                    terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
                    raise DivergenceError(
                        f"non-finite loss at step {self.step}, phase '{phase.name}' "
                        f"({terms or 'loss=' + str(loss.item())}); the last good checkpoint is kept in "
                        f"{self.run_dir}: rerun with --resume and a lower learning rate")
                self.accelerator.backward(loss / len(batches))
            for key, v in logs.items():
                totals[key] = totals.get(key, 0.0) + v / len(batches)
        logs = totals
        params = self.method.phase_parameters(phase)
        norm = self.accelerator.clip_grad_norm_(params, phase.grad_clip or float("inf"))
        if norm is not None and not torch.isfinite(torch.as_tensor(norm)) and self.config.mixed_precision != "fp16":
            raise DivergenceError(
                f"non-finite gradient at step {self.step}, phase '{phase.name}' (loss {loss.item():.4g}); the last "
                f"good checkpoint is kept in {self.run_dir}: rerun with --resume and a lower learning rate")
        for group in opt.param_groups:  # a function of the step alone: nothing to checkpoint
            group["lr"] = phase.lr_at(self.step, self.config.warmup_steps) * group.get("lr_scale", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {f"{phase.name}/{k}": v for k, v in logs.items()}

    def sample_grid(self, path: Path) -> None:
        m = self.method
        n_cls = max(m.num_classes, 1)
        labels = torch.arange(n_cls).repeat_interleave(self.config.grid_per_class).to(self.accelerator.device)
        gen = torch.Generator(self.accelerator.device).manual_seed(self.config.seed)
        rng = torch.get_rng_state()
        m.eval()
        autocast = self.accelerator.autocast() if self.frozen_cast else contextlib.nullcontext()
        with torch.no_grad(), self.ema.applied(m.student_net()), autocast:
            images = m.sample(labels, gen).float()
        m.train()
        torch.set_rng_state(rng)
        save_grid(images, path, nrow=self.config.grid_per_class)
        reason = collapse_reason(images)
        if reason:
            self.collapse_warnings.append(f"step {self.step}: {reason}")
            tqdm.write(f"dstudio: warning: step {self.step}: the student's samples look collapsed ({reason}); "
                       f"see {path}", file=sys.stderr)

    def train_step(self) -> dict[str, float]:
        """Step `self.step`: its micro-batches, each active phase (hooks on a phase's first step), the EMA update."""
        # data-free methods get a batch of the per-process size without images
        batches = [self.stream.next(self.accelerator.device) if self.stream
                   else Batch.data_free(self.config.batch_size) for _ in range(self.config.grad_accum)]
        logs = {}
        for phase in self.phases:
            if phase.active(self.step):
                if self.step == phase.start:
                    self.method.on_phase_start(phase, self.step)
                logs.update(self._run_phase(phase, batches))
        self.ema.update(self.method.student_net(), self.step)
        return logs

    def fit(self, resume: bool = False, export: bool = True, overwrite: bool = False) -> Path | None:
        """Train (a fresh run needs a folder without a run, or `overwrite`), checkpoint, export. A SIGTERM, SIGINT
        or SIGUSR1 stops after the current step with a checkpoint and raises signals.Stopped."""
        check_run_folder(self.run_dir, resume, overwrite)
        lock = run_folder_lock(self.run_dir) if self.is_main else contextlib.nullcontext()
        with lock, stop_signals():
            state = self._read_checked_checkpoint() if resume else None
            if overwrite and self.is_main:
                clear_run(self.run_dir)
            self._fit(state, export)
        return self.run_dir / "pipeline" if export else None

    def _fit(self, state: dict | None, export: bool) -> None:
        cfg = self.config
        self.method.on_fit_start(self.run_dir, self.accelerator, self.config.steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.run_dir / "log.jsonl"
        if state is not None:
            self._restore(state)
        else:
            torch.manual_seed(cfg.seed + self.accelerator.process_index)
            np.random.seed(cfg.seed)
            random.seed(cfg.seed)
        if self.is_main:
            drop_stale_temps(self.run_dir / CHECKPOINT)
            _trim_log(log_file, self.step)  # one run, one log: no lines from a fresh start or past the checkpoint
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.resolved_config, sort_keys=False))
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.method.name}", disable=not self.is_main,
                   dynamic_ncols=True)
        self.model.train()
        t0 = time.time()
        with bar:  # closed (its line ended) before an error or the stop message is printed
            while self.step < cfg.steps:
                logs = self.train_step()
                self.step += 1
                bar.update(1)
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in logs.items() if math.isfinite(v)})
                    append_line(log_file, json.dumps({"step": self.step, "time": round(time.time() - t0, 2), **logs}))
                if self.step % cfg.sample_every == 0 and self.is_main:
                    self.sample_grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
                saved = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                if saved:
                    self.save_checkpoint()
                signum = stop_requested()
                if signum:
                    if not saved:
                        self.save_checkpoint()
                    raise Stopped(f"stopped at step {self.step}; rerun with --resume", signum)
        if not export:
            return
        if self.is_main:
            with self.ema.applied(self.method.student_net()):
                self.method.export(self.run_dir / "pipeline")
            self.sample_grid(self.run_dir / "samples" / "final.png")
            if self.collapse_warnings:
                print(f"dstudio: warning: collapsed samples at {'; '.join(self.collapse_warnings)}", file=sys.stderr)
        self.accelerator.wait_for_everyone()


def _trim_log(log_file: Path, step: int) -> None:
    """Keep only the log lines of steps <= `step` (all of them gone for a fresh start)."""
    if not log_file.is_file():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):  # a line cut short by a kill
            return math.inf

    keep = [line for line in log_file.read_text().splitlines() if step and logged_step(line) <= step]
    with atomic_path(log_file) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
