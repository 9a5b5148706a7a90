"""What one `dstudio app` serves: the pipelines found, the folders the page may read, and the job queue, with the
checks a job's form goes through before it is queued."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

from dstudio.app.studio.compare import MAX_IMAGES, MAX_ROWS, MAX_STEPS, Entry, Row, find_pipelines, sample_row
from dstudio.app.studio.jobs import JOB_CONCURRENCY, MAX_JOBS, Job, JobQueue
from dstudio.app.studio.safety import as_page_errors, check, check_arguments, check_override, confine

MAX_JOB_STEPS = 100_000   # training steps of a job started from the page
SEARCH_TAIL = ["--population", "8", "--generations", "3", "--num-samples", "200"]  # a small search from the page


class Studio:
    """The pipelines found, the folders the page may read (the runs folder and the --teacher folders), the queue."""

    def __init__(self, runs: str | Path = "runs", teachers: tuple = (), concurrency: int = JOB_CONCURRENCY,
                 max_jobs: int = MAX_JOBS):
        self.runs = Path(runs).resolve()
        self.teachers = tuple(Path(t).resolve() for t in teachers)
        self.entries: list[Entry] = []
        self.queue = JobQueue(concurrency, max_jobs)
        self.rescan()

    def rescan(self) -> list[Entry]:
        """Look for new pipelines (finished jobs, new exports); loaded pipelines are kept, failed ones retried."""
        loaded = {(e.name, e.path, e.scheduler_dir): e for e in self.entries if e.available}
        fresh = find_pipelines(self.runs, self.teachers)
        self.entries = [loaded.get((e.name, e.path, e.scheduler_dir), e) for e in fresh]
        return self.entries

    def names(self) -> list[str]:
        return [e.name for e in self.entries if e.available]

    def entry(self, name: str) -> Entry:
        found = next((e for e in self.entries if e.name == name), None)
        if found is None:
            found = next((e for e in self.rescan() if e.name == name), None)
        check(found is not None, f"unknown pipeline '{name}'")
        return found

    def confine(self, text: str, what: str) -> Path:
        """`text` as a path if it lies in the runs folder or a --teacher folder (relative ones from the runs folder)."""
        return confine(text, what, self.runs, self.teachers)

    def compare(self, names: list[str], class_label, prompt: str, seed: int, steps: int, guidance: float,
                num_images: int) -> list[Row]:
        check(bool(names), "choose at least one pipeline")
        check(len(names) <= MAX_ROWS, f"{len(names)} pipelines chosen: compare at most {MAX_ROWS} at once")
        check(0 <= int(steps) <= MAX_STEPS, f"steps {steps} is outside 0..{MAX_STEPS} (0: the pipeline's own default)")
        check(1 <= int(num_images) <= MAX_IMAGES, f"images per pipeline {num_images} is outside 1..{MAX_IMAGES}")
        return [sample_row(self.entry(n), class_label, prompt, int(seed), int(steps), float(guidance), int(num_images))
                for n in dict.fromkeys(names)]

    def _distill_tail(self, method: str, preset: str, steps: int, sets: list[str]) -> list[str]:
        """A distillation job's options: its preset (a file only inside the confined folders) and checked overrides."""
        from dstudio.distill.core.run import RunRequest, resolve_config

        preset = preset.strip() or "quick"
        if Path(preset).suffix in (".yaml", ".yml"):
            preset = str(self.confine(preset, "preset file"))
        for text in sets:
            check_override(text, self.runs, self.teachers)
        with as_page_errors():  # the run's own config checks (preset, overrides, types, keys) before the job waits
            resolve_config(RunRequest(method, self.runs / "app" / "check", preset=preset, overrides=sets,
                                      steps=int(steps) or None))
        steps_args = ["--steps", str(int(steps))] if steps else []
        return ["--preset", preset, "--eval-per-class", "0", *steps_args, *(a for t in sets for a in ("--set", t))]

    def job_argv(self, method: str, teacher: str, preset: str, steps: int, overrides: str):
        """The CLI arguments of a job (as a function of its fresh run folder), checked by the CLI's own parser."""
        check(0 <= int(steps) <= MAX_JOB_STEPS, f"steps {steps} is outside 0..{MAX_JOB_STEPS} (0: the preset's)")
        head = ["search"] if method == "search" else ["distill", method]
        if teacher.strip():
            folder = self.confine(teacher, "teacher folder")
            check((folder / "model_index.json").is_file(),
                  f"teacher folder '{teacher.strip()}' is not a diffusers pipeline folder (no model_index.json)")
            head += ["--teacher", str(folder)]
        sets = [line.strip() for line in overrides.splitlines() if line.strip()]
        if method == "search":
            check(not sets, "a search takes no --set overrides")
            tail = ["--nfe", str(int(steps) or 4), *SEARCH_TAIL]
        else:
            tail = self._distill_tail(method, preset, steps, sets)
        check_arguments(head + tail + ["--out", str(self.runs / "app" / "check")])
        return lambda run_dir: head + tail + ["--out", str(run_dir)]

    def submit(self, method: str, teacher: str, preset: str, steps: int, overrides: str) -> Job:
        argv_for = self.job_argv(method, teacher, preset, steps, overrides)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.queue.submit(argv_for, lambda n: self._fresh(f"{method}-{stamp}-{n}"), self.runs)

    def _fresh(self, name: str) -> Path:
        """A run folder no one has used: the CLI refuses fresh runs into used folders."""
        base = self.runs / "app"
        for i in itertools.count():
            run = base / (name if i == 0 else f"{name}-{i}")
            if not run.exists() and not run.with_name(run.name + ".log").exists():
                return run
        raise AssertionError("unreachable")
