"""Run folders and their checkpoints: the fresh-run / --resume / --overwrite checks, the checkpoint format (tensors
and plain data, read with weights_only=True), the resume checks, the RNG state and the one log of a run."""
from __future__ import annotations

import json
import math
import random
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dstudio.distill.core.errors import UserError
from dstudio.distill.core.io import atomic_path

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # tensors and plain data only, loaded with weights_only=True
SHARDED = "checkpoint"  # trainer.strategy=fsdp's checkpoint: a folder of per-rank shards (sharded_checkpoint.py)
RUN_MARKERS = (CHECKPOINT, SHARDED, "pipeline")  # what makes a folder hold a run
RUN_OUTPUTS = (CHECKPOINT, SHARDED, "pipeline", "log.jsonl", "samples", "config.yaml", "eval.json")  # what --overwrite
                                                                                                     # clears
# Config keys a --resume may change: run length, logging, learning rates. Any other difference changes the
# networks or what they learn, and is refused.
RESUMABLE_TRAINER_KEYS = {"steps", "batch_size", "grad_accum", "ema_decay", "log_every", "sample_every",
                          "checkpoint_every", "grid_per_class", "mixed_precision", "cpu", "deterministic",
                          "gradient_checkpointing", "strategy"}
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


def dstudio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dstudio")
    except PackageNotFoundError:
        return "unknown"


def rng_state() -> dict:
    """Every generator's state as tensors and lists (nothing that needs unpickling code)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def read_run_checkpoint(run_dir: Path) -> dict:
    """A run folder's checkpoint: checkpoint.pt, or the sharded checkpoint/ folder an FSDP run writes (its common
    part, with a reader of its shards under "reader")."""
    if (run_dir / SHARDED).is_dir():
        from dstudio.distill.core.sharded_checkpoint import read_sharded

        return read_sharded(run_dir / SHARDED)
    return read_checkpoint(run_dir / CHECKPOINT)


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


@dataclass(frozen=True)
class RunStart:
    """A run folder checked for one run: a fresh start (empty, or --overwrite) or a --resume with its checkpoint
    read and checked against the run (`state`, and the allowed config `changes` it makes)."""

    run_dir: Path
    resume: bool = False
    overwrite: bool = False
    state: dict | None = None
    changes: dict[str, tuple] = field(default_factory=dict)

    def announcement(self) -> str | None:
        """The line a resume that changes run length, logging or learning rates prints (None: nothing changed)."""
        if not self.changes:
            return None
        return "dstudio: resuming with " + ", ".join(f"{k}={new!r} (was {old!r})" for k, (old, new) in self.changes.items())


def open_run_folder(run_dir: str | Path, resume: bool, overwrite: bool, method_name: str, config: dict) -> RunStart:
    """Check `run_dir` for a run of `method_name` with resolved `config`, reading its checkpoint on --resume."""
    run_dir = Path(run_dir)
    check_run_folder(run_dir, resume, overwrite)
    if not resume:
        return RunStart(run_dir, overwrite=overwrite)
    state = read_run_checkpoint(run_dir)
    return RunStart(run_dir, True, False, state, check_resume(state, method_name, config, run_dir))


def trim_log(log_file: Path, step: int) -> None:
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
