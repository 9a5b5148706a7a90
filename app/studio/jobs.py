"""The Jobs tab's model: `dstudio` runs started from the page as subprocesses of the CLI, in a bounded queue that a
thread drains (at most `concurrency` at once), each followed through its run folder's log.jsonl and sample grids."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

from dstudio.app.studio.safety import check

JOB_CONCURRENCY = 1       # jobs that run at once; the others wait in the queue
MAX_JOBS = 4              # jobs queued or running at once
CLI = (sys.executable, "-m", "dstudio.app.cli")  # what a job's arguments are given to


def loss_curves(log: Path) -> list[dict]:
    """{step, loss, value} for every finite number in the run's log.jsonl (JSON only; a half-written line is skipped)."""
    points = []
    lines = log.read_text().splitlines() if log.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                points.append({"step": record.get("step", 0), "loss": key, "value": float(value)})
    return points


class Job:
    """A `dstudio` run queued from the page: the same command and run folder as on the command line."""

    def __init__(self, number: int, argv: list[str], run_dir: Path, cwd: Path, program: tuple = CLI):
        self.number, self.argv, self.run_dir, self.cwd, self.program = number, argv, run_dir, cwd, program
        self.log_path = run_dir.with_name(run_dir.name + ".log")  # beside the run folder, which the CLI creates
        self.proc: subprocess.Popen | None = None
        self.cancelled = False

    @property
    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.proc is None:
            return "queued"
        code = self.proc.poll()
        return "running" if code is None else "done" if code == 0 else "failed"

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def command(self) -> str:
        return "dstudio " + " ".join(self.argv)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([*self.program, *self.argv], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.cwd)

    def _log_lines(self) -> list[str]:
        return self.log_path.read_text().replace("\r", "\n").splitlines() if self.log_path.is_file() else []

    def progress(self) -> str:
        """The last log.jsonl step, or else the command's own last progress line."""
        points = loss_curves(self.run_dir / "log.jsonl")
        if points:
            step = points[-1]["step"]
            return f"step {step}: " + ", ".join(f"{p['loss']} {p['value']:.4g}" for p in points if p["step"] == step)
        return next((line.strip() for line in reversed(self._log_lines()) if line.strip()),
                    "waiting in the queue")[:300]

    def latest_grid(self) -> Path | None:
        samples = self.run_dir / "samples"
        grids = sorted(samples.glob("step_*.png")) if samples.is_dir() else []
        grids += [p for p in (samples / "final.png", self.run_dir / "search.png") if p.is_file()]
        return grids[-1] if grids else None

    def error(self) -> str | None:
        """The run's one-line CLI error, if it failed."""
        if self.state != "failed":
            return None
        tail = [line for line in self._log_lines() if line.startswith("dstudio: ")]
        return tail[-1] if tail else f"the run stopped with exit code {self.proc.returncode}"

    def cancel(self) -> None:
        self.cancelled = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class JobQueue:
    """At most `concurrency` jobs run at once; at most `max_jobs` are queued or running; a thread starts the next."""

    def __init__(self, concurrency: int = JOB_CONCURRENCY, max_jobs: int = MAX_JOBS, program: tuple = CLI):
        self.concurrency, self.max_jobs, self.program = concurrency, max_jobs, program
        self.jobs: list[Job] = []
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        threading.Thread(target=self._tick, daemon=True).start()

    def submit(self, argv_for, run_dir_for, cwd: Path) -> Job:
        with self._lock:
            active = sum(j.active for j in self.jobs)
            check(active < self.max_jobs, f"{active} jobs are already queued or running (at most {self.max_jobs}): "
                                          "wait for one to finish or cancel one")
            number = next(self._numbers)
            run_dir = run_dir_for(number)
            job = Job(number, argv_for(run_dir), run_dir, cwd, self.program)
            self.jobs.append(job)
        self.poll()
        return job

    def poll(self) -> None:
        with self._lock:
            running = sum(j.state == "running" for j in self.jobs)
            for job in self.jobs:
                if running >= self.concurrency:
                    break
                if job.state == "queued":
                    job.start()
                    running += 1

    def cancel(self, job: Job) -> None:
        """Stop a running job, or drop a queued one before it starts."""
        with self._lock:
            job.cancel()

    def get(self, number: int) -> Job:
        job = next((j for j in self.jobs if j.number == number), None)
        check(job is not None, f"no job {number}")
        return job

    def table(self) -> list[list]:
        return [[j.number, j.state, j.command(), str(j.run_dir)] for j in reversed(self.jobs)]

    def _tick(self) -> None:
        while True:
            time.sleep(0.5)
            self.poll()
