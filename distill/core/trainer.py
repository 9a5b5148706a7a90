"""The one training loop for every method: phases, EMA, clipping, grids, atomic checkpoints, resume, export."""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from dstudio.distill.core.batch_stream import BatchStream
from dstudio.distill.core.checkpoint import (CHECKPOINT, CHECKPOINT_FORMAT, RunStart, clear_run, dstudio_version,
                                             open_run_folder, rng_state, set_rng_state, trim_log)
from dstudio.distill.core.config import require, to_dict
from dstudio.distill.core.errors import UserError
from dstudio.distill.core.ema import EMA
from dstudio.distill.core.images import collapse_reason, save_grid
from dstudio.distill.core.io import append_line, atomic_path, drop_stale_temps, run_folder_lock, save_torch
from dstudio.distill.core.memory import cast_frozen, enable_gradient_checkpointing, frozen_dtype
from dstudio.distill.core.method import Batch, BatchSource, Method, Phase, RunContext
from dstudio.distill.core.sharded_checkpoint import SHARDED, save_sharded
from dstudio.distill.core.sharding import (check_strategy, device_mesh, full_state, full_tensor, gradient_sync,
                                           launched_processes, meta_copy, plain_network, reshard, shard_method,
                                           sharded_optimizer_state, sharded_state)
from dstudio.distill.core.signals import Stopped, stop_requested, stop_signals

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
    # under a multi-process launch: ddp (every process holds every network) or fsdp (FSDP2: each holds 1/N of every
    # network, optimiser state and EMA); one process runs as is either way
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def validate(self) -> None:
        check_strategy(self.strategy, self.mixed_precision)
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


def cpu_only() -> bool:
    """No accelerator here: tell accelerate, so that a multi-process launch on CPUs runs data-parallel (gloo)."""
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


class Trainer:
    """Runs a Method's phases for `config.steps` steps in `run_dir` and exports its student.

    `fit()` is the whole run. Step by step (a benchmark's loop): `begin()` once, then `train_step()` per step;
    `run_phase(phase, batches)` runs one phase's update on given micro-batches."""

    def __init__(self, method: Method, config: TrainerConfig, run_dir: str | Path, data=None,
                 resolved_config: dict | None = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.benchmark = False
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        # Phases train different parameters, so every DDP step leaves some of them unused.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.fsdp = config.strategy == "fsdp" and launched_processes() > 1
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu or cpu_only(),
                                       kwargs_handlers=[ddp])
        self.method = method.to(self.accelerator.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(method)
        dtype = frozen_dtype(config.frozen_dtype, config.mixed_precision)
        self.frozen_cast = dtype is not None and cast_frozen(method, dtype) > 0  # then grids sample under autocast
        self.phases = method.phases()
        if self.fsdp:  # a meta copy of the student to export into, then every network sharded in place
            self.export_template = meta_copy(method.student_net())
            shard_method(method, device_mesh(self.accelerator.device), config.mixed_precision, dtype)
        # foreach: one kernel per op over all tensors, on CPUs too (torch picks it by default on CUDA only)
        optimizers = [torch.optim.AdamW(method.param_groups(ph), lr=ph.lr, betas=ph.betas,
                                        weight_decay=ph.weight_decay, foreach=True) for ph in self.phases]
        # `model` is what runs the losses (DDP-wrapped on many processes); `method` stays the plain module.
        if not self.fsdp:
            self.model, *optimizers = self.accelerator.prepare(self.method, *optimizers)
        else:
            self.model = self.method
        self.optimizers = {ph.name: opt for ph, opt in zip(self.phases, optimizers)}
        self.ema = EMA(method.student_net(), config.ema_decay)
        self.stream = None
        if method.needs_data:
            require(data is not None, f"method {method.name} needs a data set")
            self.stream = BatchStream(data, config.batch_size, config.seed,
                                      self.accelerator.process_index, self.accelerator.num_processes)
        self.sources: dict[str, BatchSource] = {}  # the phases' own batch sources, opened at their first step
        self.step = 0
        self.collapse_warnings: list[str] = []  # what the periodic sample check found, for the final report
        self.resolved_config = resolved_config or {"trainer": to_dict(config), "method": to_dict(method.config)}

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def context(self) -> RunContext:
        """What the method is given for this run: folder, accelerator, step budget and EMA."""
        return RunContext(self.run_dir, self.accelerator, self.config.steps, self.ema)

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
            "rng": rng_state(),
            "config": json.dumps(self.resolved_config),
        }

    def save_checkpoint(self) -> None:
        """checkpoint.pt from the main process, or under FSDP a sharded checkpoint/ folder from every process (the
        other kind, left by a resume that changed trainer.strategy, is removed once this one is whole)."""
        if self.fsdp:
            save_sharded(self.state_dict(), self.run_dir)
        elif self.is_main:
            save_torch(self.state_dict(), self.run_dir / CHECKPOINT)
        if self.is_main:
            stale = self.run_dir / (CHECKPOINT if self.fsdp else SHARDED)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self) -> None:
        """Check the run folder's checkpoint against this run, then restore it."""
        self.restore(open_run_folder(self.run_dir, True, False, self.method.name, self.resolved_config).state)

    def restore(self, state: dict) -> None:
        """Networks, optimisers (with this run's learning rates), EMA, data order, RNG and step from a checkpoint."""
        reader, rank = state.get("reader"), self.accelerator.process_index
        try:
            if reader:  # a sharded checkpoint: cut for this run's shards, or whole for unsharded networks
                state = reader.local_state(self.method, self.optimizers, self.ema, rank) if self.fsdp else \
                    reader.full_state(rank)
            for name, sd in state["modules"].items():
                module = getattr(self.method, name)
                module.load_state_dict(sharded_state(sd, module.state_dict()) if self.fsdp else sd)
            for name, sd in state["optimizers"].items():
                opt = self.optimizers[name]
                opt.load_state_dict(sharded_optimizer_state(sd, opt) if self.fsdp else sd)
        except (RuntimeError, KeyError, AttributeError, ValueError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint '{self.run_dir / (SHARDED if reader else CHECKPOINT)}' does not fit this run's networks ({first}); "
                            f"was the teacher changed? --overwrite starts over") from None
        for phase in self.phases:  # a resume may change learning rates: the phase's own settings win
            for group in self.optimizers[phase.name].param_groups:
                group.update(lr=phase.lr * group.get("lr_scale", 1.0), betas=phase.betas,
                             weight_decay=phase.weight_decay)
        self.ema.load_state_dict(list(sharded_state(dict(enumerate(state["ema"])), dict(enumerate(self.ema.shadow)))
                                      .values()) if self.fsdp else state["ema"])
        if self.stream and state["stream"]:
            self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    # --- the steps --------------------------------------------------------------------------------
    def begin(self, state: dict | None = None) -> None:
        """Make the run ready for its first step: give the method its run context, then restore `state` (a
        checkpoint's) or seed every generator."""
        self.method.bind(self.context())
        self.sources = {}
        if state is not None:
            self.restore(state)
        else:
            torch.manual_seed(self.config.seed + self.accelerator.process_index)
            np.random.seed(self.config.seed)
            random.seed(self.config.seed)

    def micro_batches(self, phase: Phase, batches: list):
        """The phase's micro-batches: the given ones, or as many drawn from its own source, each just before its loss
        runs. The source opens at its first use under autocast, in a region of its own: a cast it caches (of weights
        swapped in to make its batches, an EMA) must not reach the losses."""
        if phase.batches is None:
            yield from batches
            return
        if phase.name not in self.sources:
            with self.accelerator.autocast():
                self.sources[phase.name] = phase.batches()
        for batch in batches:
            yield self.sources[phase.name].next(batch.size, self.accelerator.device)

    def run_phase(self, phase: Phase, batches: list) -> dict[str, float]:
        """One optimiser update of `phase` on its micro-batches (gradients summed), clipped; its logged terms."""
        self.method.train_only(phase)
        totals: dict[str, float] = {}
        for i, batch in enumerate(self.micro_batches(phase, batches)):
            # gradients of all but the last micro-batch stay local: DDP all-reduces (FSDP reduce-scatters) once, at
            # the last backward
            last = i == len(batches) - 1
            sync = gradient_sync(self.method, last) if self.fsdp else \
                contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
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
        self._update(phase, loss)
        return {f"{phase.name}/{k}": v for k, v in totals.items()}

    def _update(self, phase: Phase, loss: Tensor) -> None:
        """Clip the phase's summed gradients, set its learning rate for this step, take the optimiser step."""
        opt = self.optimizers[phase.name]
        if self.fsdp:
            reshard(self.method)
        norm = full_tensor(self.accelerator.clip_grad_norm_(self.method.phase_parameters(phase),
                                                            phase.grad_clip or float("inf")))
        if norm is not None and not torch.isfinite(torch.as_tensor(norm)) and self.config.mixed_precision != "fp16":
            raise DivergenceError(
                f"non-finite gradient at step {self.step}, phase '{phase.name}' (loss {loss.item():.4g}); the last "
                f"good checkpoint is kept in {self.run_dir}: rerun with --resume and a lower learning rate")
        for group in opt.param_groups:  # a function of the step alone: nothing to checkpoint
            group["lr"] = phase.lr_at(self.step, self.config.warmup_steps) * group.get("lr_scale", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_step(self) -> dict[str, float]:
        """Step `self.step` (its micro-batches, each active phase with its hook at the phase's first step, the EMA
        update), then advance `self.step`; the step's logged terms."""
        # data-free methods get a batch of the per-process size without images
        batches = [self.stream.next(self.accelerator.device) if self.stream
                   else Batch.data_free(self.config.batch_size) for _ in range(self.config.grad_accum)]
        logs = {}
        for phase in self.phases:
            if phase.active(self.step):
                if self.step == phase.start:
                    self.method.on_phase_start(phase, self.step)
                logs.update(self.run_phase(phase, batches))
        self.ema.update(self.method.student_net(), self.step)
        self.step += 1
        return logs

    def sample_grid(self, path: Path) -> None:
        m = self.method
        labels = m.grid_classes().repeat_interleave(self.config.grid_per_class).to(self.accelerator.device)
        gen = torch.Generator(self.accelerator.device).manual_seed(self.config.seed)
        rng = torch.get_rng_state()
        m.eval()
        autocast = self.accelerator.autocast() if self.frozen_cast else contextlib.nullcontext()
        with torch.no_grad(), self.ema.applied(m.student_net()), autocast:
            images = m.sample(labels, gen).float()
            if self.fsdp:  # the shards back in place before the live weights are
                reshard(m)
        m.train()
        torch.set_rng_state(rng)
        if not self.is_main:  # under FSDP every process samples (each holds a shard of the student), one saves
            return
        save_grid(images, path, nrow=self.config.grid_per_class)
        reason = collapse_reason(images)
        if reason:
            self.collapse_warnings.append(f"step {self.step}: {reason}")
            tqdm.write(f"dstudio: warning: step {self.step}: the student's samples look collapsed ({reason}); "
                       f"see {path}", file=sys.stderr)

    # --- the run ----------------------------------------------------------------------------------
    def fit(self, resume: bool = False, export: bool = True, overwrite: bool = False,
            start: RunStart | None = None) -> Path | None:
        """Train (a fresh run needs a folder without a run, or `overwrite`), checkpoint, export. `start`: the run
        folder already checked (and its checkpoint read) by `prepare_run`. A SIGTERM, SIGINT or SIGUSR1 stops after
        the current step with a checkpoint and raises signals.Stopped."""
        lock = run_folder_lock(self.run_dir) if self.is_main else contextlib.nullcontext()
        with lock, stop_signals():
            start = start or open_run_folder(self.run_dir, resume, overwrite, self.method.name, self.resolved_config)
            if start.overwrite and self.is_main:
                clear_run(self.run_dir)
            self._fit(start, export)
        return self.run_dir / "pipeline" if export else None

    def _fit(self, start: RunStart, export: bool) -> None:
        if start.announcement() and self.is_main:
            print(start.announcement(), file=sys.stderr)
        self.begin(start.state)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            drop_stale_temps(self.run_dir / CHECKPOINT)
            trim_log(self.run_dir / "log.jsonl", self.step)  # one run, one log: no lines past the checkpoint
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.resolved_config, sort_keys=False))
        bar = tqdm(total=self.config.steps, initial=self.step, desc=f"{self.method.name}", disable=not self.is_main,
                   dynamic_ncols=True)
        self.model.train()
        t0 = time.time()
        with bar:  # closed (its line ended) before an error or the stop message is printed
            while self.step < self.config.steps:
                logs = self.train_step()
                bar.update(1)
                self._after_step(logs, bar, t0)
        if export:
            self._export()

    def _after_step(self, logs: dict[str, float], bar, t0: float) -> None:
        """Log, draw a grid and checkpoint as the config asks; a stop signal saves and stops here."""
        cfg, log_file = self.config, self.run_dir / "log.jsonl"
        if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
            bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in logs.items() if math.isfinite(v)})
            append_line(log_file, json.dumps({"step": self.step, "time": round(time.time() - t0, 2), **logs}))
        if self.step % cfg.sample_every == 0 and (self.is_main or self.fsdp):
            self.sample_grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
        saved = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
        if saved:
            self.save_checkpoint()
        signum = stop_requested()
        if signum:
            if not saved:
                self.save_checkpoint()
            raise Stopped(f"stopped at step {self.step}; rerun with --resume", signum)

    def _export(self) -> None:
        """The student (its EMA weights) as a pipeline folder, and the final grid."""
        if self.fsdp:
            return self._export_sharded()
        if self.is_main:
            with self.ema.applied(self.method.student_net()):
                self.method.export(self.run_dir / "pipeline")
            self.sample_grid(self.run_dir / "samples" / "final.png")
            if self.collapse_warnings:
                print(f"dstudio: warning: collapsed samples at {'; '.join(self.collapse_warnings)}", file=sys.stderr)
        self.accelerator.wait_for_everyone()

    def _export_sharded(self) -> None:
        """FSDP: the student's EMA weights gathered (every process), exported from a plain copy by the main process;
        the final grid sampled by every process."""
        m = self.method
        with self.ema.applied(m.student_net()) as net:
            state = full_state(net)
        if self.is_main:
            live = m.student_net()
            setattr(m, m.student_module, plain_network(self.export_template, state, self.accelerator.device))
            try:
                m.export(self.run_dir / "pipeline")
            finally:
                setattr(m, m.student_module, live)
        del state
        self.sample_grid(self.run_dir / "samples" / "final.png")
        if self.is_main and self.collapse_warnings:
            print(f"dstudio: warning: collapsed samples at {'; '.join(self.collapse_warnings)}", file=sys.stderr)
        self.accelerator.wait_for_everyone()
