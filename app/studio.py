"""`dstudio app`: the studio in the browser (Gradio Blocks). Compare pipelines row by row on the same noise,
browse every FID result with its Pareto front, and queue distillations or searches from the page.

Every method and search result appears through the registries and the run folders: no app code per method.
Paths typed into the page are confined to the runs folder and the --teacher folders given on the command line.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dstudio.app.benchmark import ROOT
from dstudio.distill.evaluation.protocol import timed

MAX_STEPS = 100           # sampling steps in Compare (the slider's end)
MAX_IMAGES = 16           # images per pipeline in Compare
MAX_ROWS = 6              # pipelines compared at once
MAX_PER_CLASS = 500       # images per class for "Compute FID"
JOB_CONCURRENCY = 1       # jobs that run at once; the others wait in the queue
MAX_JOBS = 4              # jobs queued or running at once
MAX_JOB_STEPS = 100_000   # training steps of a job started from the page
READABLE = 128            # tiny images are upscaled (nearest neighbour) to at least this many pixels
CLI = (sys.executable, "-m", "dstudio.app.cli")  # what a job's arguments are given to
GALLERY_LINE = 152        # pixels per line of 8 images in a Compare row (at a 1280 px wide window)
BOARD_COLUMNS = ["source", "method", "row", "nfe", "fid", "images_per_s"]


def _check(condition: bool, message: str) -> None:
    import gradio as gr

    if not condition:
        raise gr.Error(message)


# --- pipelines ----------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One pipeline the app can sample: the teacher, an exported student, or the teacher with a saved schedule."""

    name: str
    path: Path
    kind: str                     # "teacher", "student" or "schedule"
    scheduler_dir: Path | None = None
    error: str | None = None      # why it is unavailable
    _pipe: object = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.error is None

    def pipeline(self):
        if self._pipe is None:
            from dstudio.distill.core.teacher import load_pipeline

            pipe = load_pipeline(self.path)
            if self.scheduler_dir is not None:
                from dstudio.app.cli import load_scheduler

                pipe.scheduler = load_scheduler(str(self.scheduler_dir))
            self._pipe = pipe
        return self._pipe

    def method(self) -> str:
        """The method that made it: the run's dstudio.json for students."""
        if self.kind != "student":
            return {"teacher": "teacher", "schedule": "searched schedule"}[self.kind]
        info = self.path / "dstudio.json"
        try:
            return json.loads(info.read_text()).get("method") or self.kind
        except (OSError, json.JSONDecodeError, AttributeError):
            return self.kind


def discover(runs: str | Path | None, teachers: tuple[Path, ...] = ()) -> list[Entry]:
    """The shipped teacher and the --teacher folders, then every pipeline folder and saved schedule under `runs`
    (unloadable ones included, with the reason they cannot be used)."""
    from dstudio.distill.core.teacher import DEFAULT_TEACHER

    entries = [Entry("teacher", DEFAULT_TEACHER, "teacher")]
    entries += [Entry(f"teacher:{t.name}", t, "teacher") for t in teachers]
    if runs is not None and Path(runs).is_dir():
        root = Path(runs).resolve()
        for index in sorted(root.rglob("model_index.json")):
            folder = index.parent
            if folder.resolve().is_relative_to(root) and folder.resolve() not in teachers:
                entries.append(Entry(str(folder.relative_to(root)), folder, "student"))
        for config in sorted(root.rglob("scheduler_config.json")):
            folder = config.parent
            if (folder.parent / "model_index.json").is_file() or not folder.resolve().is_relative_to(root):
                continue  # a pipeline's own scheduler
            entries.append(Entry(f"teacher + {folder.relative_to(root)}", DEFAULT_TEACHER, "schedule", folder))
    for e in entries[1:]:
        try:
            e.pipeline()
        except Exception as err:  # listed as unavailable with its reason; the rest still works
            e.error = str(err).splitlines()[0] if str(err) else type(err).__name__
    return entries


def readable(img):
    """A tiny image upscaled by a whole factor with nearest neighbour, so each pixel stays a crisp square."""
    from PIL import Image

    factor = math.ceil(READABLE / min(img.width, img.height))
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor > 1 else img


@dataclass
class Row:
    """One Compare row: a pipeline's images on the shared noise and what that run measured."""

    name: str
    method: str
    nfe: int
    seconds_per_image: float
    images: list

    def label(self, first: "Row") -> str:
        speedup = first.seconds_per_image / max(self.seconds_per_image, 1e-12)
        return (f"{self.name} · {self.method} · {self.nfe} NFE · {self.seconds_per_image:.4g} s/image · "
                f"{speedup:.2f}x the speed of {first.name}")


def sample_row(entry: Entry, class_label: int | None, prompt: str, seed: int, steps: int, guidance: float,
               num_images: int) -> Row:
    """`num_images` images of one pipeline from the noise that `seed` draws (the same for every pipeline)."""
    _check(entry.available, f"pipeline '{entry.name}' is unavailable: {entry.error}")
    pipe = entry.pipeline()
    unet = pipe.unet
    kwargs = {"guidance_scale": float(guidance), "output_type": "pil"}
    if steps:
        kwargs["num_inference_steps"] = int(steps)
    if hasattr(pipe, "tokenizer"):
        _check(bool(prompt.strip()), f"pipeline '{entry.name}' is text-to-image: give a prompt")
        kwargs["prompt"] = [prompt] * num_images
    else:
        n_cls = (unet.config.num_class_embeds or 1) - 1
        if n_cls > 0:
            label = 0 if class_label is None else int(class_label)
            _check(0 <= label < n_cls, f"class {label} is outside this pipeline's classes 0..{n_cls - 1}")
            kwargs["class_labels"] = torch.full((num_images,), label)
        else:
            kwargs["batch_size"] = num_images
    size = unet.config.sample_size
    kwargs["latents"] = torch.randn((num_images, unet.config.in_channels, size, size),
                                    generator=torch.Generator().manual_seed(seed))
    kwargs["generator"] = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        out, seconds = timed(pipe, **kwargs)
    return Row(entry.name, entry.method(), len(pipe.scheduler.timesteps), seconds / len(out.images),
               [readable(img) for img in out.images])


# --- FID board ----------------------------------------------------------------------------------------
def fid_rows(runs: str | Path | None) -> list[dict]:
    """Every FID row of the result JSONs under benchmarks/results and of the eval.json / fid/*.json under --runs."""
    import yaml

    from dstudio.app.report import _load

    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if runs is not None and Path(runs).is_dir():
        files += sorted(p for p in Path(runs).rglob("*.json") if p.name == "eval.json" or p.parent.name == "fid")
    rows = []
    for f in files:
        try:
            section = _load(str(f))
        except Exception:
            continue
        run_method = None
        if f.name == "eval.json" and (f.parent / "config.yaml").is_file():
            try:
                run_method = (yaml.safe_load((f.parent / "config.yaml").read_text()) or {}).get("method_name")
            except yaml.YAMLError:
                pass
        for r in section["rows"]:
            if r.get("fid") is None:
                continue
            method = r.get("method") or r.get("sampler") or (run_method if r.get("name") == "student" else None)
            rows.append({"source": f.stem if f.name != "eval.json" else f.parent.name,
                         "method": method or r.get("name") or "-", "row": r.get("name"), "nfe": r.get("nfe"),
                         "fid": round(float(r["fid"]), 5),
                         "images_per_s": round(float(r["images_per_s"]), 1) if r.get("images_per_s") else None})
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both FID (lower) and images/s (higher), fastest first."""
    pts = sorted((r for r in rows if r.get("images_per_s") and r.get("fid") is not None),
                 key=lambda r: (-r["images_per_s"], r["fid"]))
    front, best = [], math.inf
    for r in pts:
        if r["fid"] < best:
            front.append(r)
            best = r["fid"]
    return front


def filter_rows(rows: list[dict], sources: list[str] | None, methods: list[str] | None) -> list[dict]:
    """The rows whose source and method are among the chosen ones (nothing chosen: all)."""
    return [r for r in rows if (not sources or r["source"] in sources) and (not methods or r["method"] in methods)]


def _hover(r: dict) -> str:
    speed = f"{r['images_per_s']:g} images/s" if r.get("images_per_s") else "speed not measured"
    return f"{r['row']} ({r['source']}, {r['method']})<br>{r['nfe']} NFE · FID {r['fid']:.4g} · {speed}"


def fid_figures(rows: list[dict]):
    """Plotly figures, each point labelled on hover: FID vs NFE, and FID vs images/s with its Pareto front drawn."""
    import plotly.graph_objects as go

    by_nfe, by_speed = go.Figure(), go.Figure()
    for source in dict.fromkeys(r["source"] for r in rows):
        pts = [r for r in rows if r["source"] == source and r["nfe"]]
        by_nfe.add_trace(go.Scatter(x=[r["nfe"] for r in pts], y=[r["fid"] for r in pts], mode="markers",
                                    name=source, text=[_hover(r) for r in pts], hoverinfo="text"))
        fast = [r for r in pts if r["images_per_s"]]
        by_speed.add_trace(go.Scatter(x=[r["images_per_s"] for r in fast], y=[r["fid"] for r in fast],
                                      mode="markers", name=source, text=[_hover(r) for r in fast], hoverinfo="text"))
    front = pareto_front(rows)
    by_speed.add_trace(go.Scatter(x=[r["images_per_s"] for r in front], y=[r["fid"] for r in front],
                                  mode="lines+markers+text", name="Pareto front", line={"shape": "hv", "color": "black"},
                                  marker={"symbol": "circle-open", "size": 12, "color": "black"},
                                  text=[r["row"] for r in front], textposition="top right",
                                  hovertext=[_hover(r) for r in front], hoverinfo="text"))
    for fig, title, x in ((by_nfe, "FID vs NFE", "NFE"), (by_speed, "FID vs speed (Pareto front: black)", "images/s")):
        fig.update_layout(title=title, xaxis={"type": "log", "title": x}, yaxis={"type": "log", "title": "FID"},
                          height=420, margin={"l": 50, "r": 10, "t": 40, "b": 40}, legend={"font": {"size": 9}})
    return by_nfe, by_speed


def compute_fid(entry: Entry, per_class: int, progress=None) -> dict:
    """FID-mnist of a class-conditional pipeline on the protocol's noise (per_class images per class)."""
    from dstudio.distill.evaluation.fid import fid_of_tensor
    from dstudio.distill.evaluation.protocol import pipeline_images, protocol_for

    _check(entry.available, f"pipeline '{entry.name}' is unavailable: {entry.error}")
    _check(1 <= int(per_class) <= MAX_PER_CLASS, f"images per class {per_class} is outside 1..{MAX_PER_CLASS}")
    pipe = entry.pipeline()
    _check(bool(pipe.unet.config.get("num_class_embeds")), "FID here is for class-conditional (MNIST) pipelines")
    proto = protocol_for(pipe, int(per_class), floor=False)
    labels, noise = proto["labels"], proto["noise"]
    step = (lambda f: progress(f, desc=f"sampling {entry.name}")) if progress is not None else None
    with torch.no_grad():
        images, seconds = pipeline_images(pipe, labels, noise, None, batch_size=100, progress=step)
    if progress is not None:
        progress(1.0, desc="features and FID")
    result = fid_of_tensor(images, proto["ref"], proto["space"], entry.name)
    return {"pipeline": entry.name, "fid": result["fid"], "images": len(images), "images_per_s": len(images) / seconds}


# --- jobs ---------------------------------------------------------------------------------------------
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

    def progress(self) -> str:
        """The last log.jsonl step, or else the command's own last progress line."""
        points = loss_curves(self.run_dir / "log.jsonl")
        if points:
            step = points[-1]["step"]
            return f"step {step}: " + ", ".join(f"{p['loss']} {p['value']:.4g}" for p in points if p["step"] == step)
        out = self.log_path.read_text().replace("\r", "\n").splitlines() if self.log_path.is_file() else []
        return next((line.strip() for line in reversed(out) if line.strip()), "waiting in the queue")[:300]

    def latest_grid(self) -> Path | None:
        samples = self.run_dir / "samples"
        grids = sorted(samples.glob("step_*.png")) if samples.is_dir() else []
        grids += [p for p in (samples / "final.png", self.run_dir / "search.png") if p.is_file()]
        return grids[-1] if grids else None

    def error(self) -> str | None:
        """The run's one-line CLI error, if it failed."""
        if self.state != "failed":
            return None
        out = self.log_path.read_text().replace("\r", "\n").splitlines() if self.log_path.is_file() else []
        tail = [line for line in out if line.startswith("dstudio: ")]
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
            _check(active < self.max_jobs, f"{active} jobs are already queued or running (at most {self.max_jobs}): "
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
        _check(job is not None, f"no job {number}")
        return job

    def table(self) -> list[list]:
        return [[j.number, j.state, j.command(), str(j.run_dir)] for j in reversed(self.jobs)]

    def _tick(self) -> None:
        while True:
            time.sleep(0.5)
            self.poll()


# --- the studio ---------------------------------------------------------------------------------------
class Studio:
    """What one `dstudio app` serves: the pipelines found, the folders the page may read, the job queue."""

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
        fresh = discover(self.runs, self.teachers)
        self.entries = [loaded.get((e.name, e.path, e.scheduler_dir), e) for e in fresh]
        return self.entries

    def names(self) -> list[str]:
        return [e.name for e in self.entries if e.available]

    def entry(self, name: str) -> Entry:
        found = next((e for e in self.entries if e.name == name), None)
        if found is None:
            found = next((e for e in self.rescan() if e.name == name), None)
        _check(found is not None, f"unknown pipeline '{name}'")
        return found

    def confine(self, text: str, what: str) -> Path:
        """`text` as a path (relative ones from the runs folder) if it lies in the runs folder or a --teacher folder."""
        path = Path(text.strip()).expanduser()
        path = (path if path.is_absolute() else self.runs / path).resolve()
        allowed = (self.runs, *self.teachers)
        _check(any(path.is_relative_to(root) for root in allowed),
               f"{what} '{text.strip()}' is outside the folders this page may use: the runs folder {self.runs}"
               + "".join(f", {t}" for t in self.teachers) + " (give more with dstudio app --teacher DIR)")
        return path

    def compare(self, names: list[str], class_label, prompt: str, seed: int, steps: int, guidance: float,
                num_images: int) -> list[Row]:
        _check(bool(names), "choose at least one pipeline")
        _check(len(names) <= MAX_ROWS, f"{len(names)} pipelines chosen: compare at most {MAX_ROWS} at once")
        _check(0 <= int(steps) <= MAX_STEPS, f"steps {steps} is outside 0..{MAX_STEPS} (0: the pipeline's own default)")
        _check(1 <= int(num_images) <= MAX_IMAGES, f"images per pipeline {num_images} is outside 1..{MAX_IMAGES}")
        return [sample_row(self.entry(n), class_label, prompt, int(seed), int(steps), float(guidance), int(num_images))
                for n in dict.fromkeys(names)]

    def job_argv(self, method: str, teacher: str, preset: str, steps: int, overrides: str):
        """The CLI arguments of a job (as a function of its fresh run folder), checked by the CLI's own parser."""
        import gradio as gr

        from dstudio.app.cli import build_parser
        from dstudio.distill.core.config import load_preset, merge_overrides, parse_override
        from dstudio.distill.core.errors import UserError

        _check(0 <= int(steps) <= MAX_JOB_STEPS, f"steps {steps} is outside 0..{MAX_JOB_STEPS} (0: the preset's)")
        head = ["search"] if method == "search" else ["distill", method]
        if teacher.strip():
            folder = self.confine(teacher, "teacher folder")
            _check((folder / "model_index.json").is_file(),
                   f"teacher folder '{teacher.strip()}' is not a diffusers pipeline folder (no model_index.json)")
            head += ["--teacher", str(folder)]
        sets = [line.strip() for line in overrides.splitlines() if line.strip()]
        if method == "search":
            _check(not sets, "a search takes no --set overrides")
            tail = ["--nfe", str(int(steps) or 4), "--population", "8", "--generations", "3", "--num-samples", "200"]
        else:
            preset = preset.strip() or "quick"
            if Path(preset).suffix in (".yaml", ".yml"):
                preset = str(self.confine(preset, "preset file"))
            tail = ["--preset", preset, "--eval-per-class", "0"] + (["--steps", str(int(steps))] if steps else [])
            for text in sets:
                try:
                    _, value = parse_override(text)
                except UserError as e:
                    raise gr.Error(f"dstudio: error: {e}") from None
                for leaf in _strings(value):  # a path, or a name the job (run from the runs folder) would open
                    if any(c in leaf for c in "/\\") or leaf.startswith(("~", ".")) or \
                            (self.runs / leaf).is_symlink() or (self.runs / leaf).exists():
                        self.confine(leaf, f"path in --set {text}")
                tail += ["--set", text]
            try:  # the CLI's own preset and override errors, before the job waits in the queue
                merge_overrides(load_preset(method, preset), sets)
            except UserError as e:
                raise gr.Error(f"dstudio: error: {e}") from None
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                build_parser().parse_args(head + tail + ["--out", str(self.runs / "app" / "check")])
            except SystemExit:
                lines = stderr.getvalue().strip().splitlines()
                raise gr.Error(lines[-1] if lines else "dstudio: error: bad arguments") from None
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


def _strings(value) -> list[str]:
    """Every string inside a YAML value (lists and mappings included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


# --- the page -----------------------------------------------------------------------------------------
CSS = """.compare-row img, #job-grid img {image-rendering: pixelated}
.row-label p {font-family: ui-monospace, monospace; font-size: 15px; margin: 0}"""


def build_app(runs: str | Path | None = "runs", teachers: tuple = (), concurrency: int = JOB_CONCURRENCY,
              max_jobs: int = MAX_JOBS):
    """The Blocks app; each event has an api_name so gradio_client (and scripts) can call it."""
    import gradio as gr
    import pandas as pd

    from dstudio.distill.core.method import discover

    studio = Studio(runs or "runs", teachers, concurrency, max_jobs)
    names = studio.names()
    distillers = sorted(n for n, c in discover().items() if c.is_distiller)

    def _unavailable() -> str:
        bad = [f"- `{e.name}`: {e.error}" for e in studio.entries if not e.available]
        return "**Unavailable pipelines**\n" + "\n".join(bad) if bad else ""

    def _choices():
        """Updates for every pipeline dropdown after a rescan (the current choice kept where it still exists)."""
        now = studio.names()
        return (gr.Dropdown(choices=now), gr.Dropdown(choices=now), gr.Dropdown(choices=now),
                gr.Dropdown(choices=now), _unavailable())

    def _generate(chosen, class_label, prompt, seed, steps, guidance, num_images):
        label = None if class_label is None or class_label == "" else int(class_label)
        rows = studio.compare(chosen or [], label, prompt or "", int(seed), int(steps), float(guidance),
                              int(num_images))
        out = []
        for i in range(MAX_ROWS):
            if i < len(rows):
                r = rows[i]
                out += [gr.Markdown(r.label(rows[0]), visible=True),
                        gr.Gallery(r.images, visible=True, height=GALLERY_LINE * math.ceil(len(r.images) / 8) + 24)]
            else:
                out += [gr.Markdown("", visible=False), gr.Gallery(None, visible=False)]
        return *out, {r.name: r.images[0] for r in rows}

    def _slider(firsts, left, right):
        firsts = firsts or {}
        _check(left in firsts and right in firsts, "generate images of both pipelines first")
        return (firsts[left], firsts[right])

    def _board(sources=None, methods=None):
        rows = fid_rows(studio.runs)
        shown = filter_rows(rows, sources, methods)
        by_nfe, by_speed = fid_figures(shown)
        table = [[r[h] for h in BOARD_COLUMNS] for r in shown]
        return (table, by_nfe, by_speed,
                gr.Dropdown(choices=list(dict.fromkeys(r["source"] for r in rows))),
                gr.Dropdown(choices=sorted({r["method"] for r in rows})))

    def _fid(name, per_class, progress=gr.Progress()):
        r = compute_fid(studio.entry(name), int(per_class), progress)
        return f"{r['pipeline']}: FID-mnist {r['fid']:.4f} on {r['images']} images, {r['images_per_s']:.0f} images/s"

    def _job_view(job: Job):
        from PIL import Image

        points = loss_curves(job.run_dir / "log.jsonl")
        grid, image = job.latest_grid(), None
        if grid is not None:
            try:
                image = readable(Image.open(grid).convert("RGB"))
            except OSError:  # the trainer is replacing it; the next view shows it
                pass
        text = f"job {job.number} {job.state}: {job.command()}\n{job.progress()}"
        return text, pd.DataFrame(points, columns=["step", "loss", "value"]), image, studio.queue.table()

    def _job(method, teacher, preset, steps, overrides):
        job = studio.submit(method, teacher or "", preset or "", int(steps or 0), overrides or "")
        while job.active:
            yield (*_job_view(job), job.number, *[gr.skip()] * 5)
            time.sleep(1.0)
        err = job.error()
        if err:
            raise gr.Error(err)
        studio.rescan()
        yield (*_job_view(job), job.number, *_choices())

    def _cancel(number):
        _check(number is not None, "start a job first")
        job = studio.queue.get(int(number))
        studio.queue.cancel(job)
        return _job_view(job)

    def _rescan():
        studio.rescan()
        return _choices()

    with gr.Blocks(title="dstudio") as demo:
        gr.Markdown("# dstudio\nTeacher, students and searched schedules row by row on the same noise.")
        unavailable = gr.Markdown(_unavailable())
        with gr.Tab("Compare"):
            with gr.Row():
                chosen = gr.Dropdown(names, value=names[:3], multiselect=True, allow_custom_value=True, scale=3,
                                     label=f"pipelines (at most {MAX_ROWS}; the first is the speed reference)")
                rescan = gr.Button("Rescan runs", scale=0)
            with gr.Row():
                class_label = gr.Number(value=3, precision=0, label="class (class-conditional pipelines)")
                prompt = gr.Textbox(label="prompt (text-to-image pipelines)")
                seed = gr.Number(value=0, precision=0, label="seed")
            with gr.Row():
                steps = gr.Slider(0, MAX_STEPS, value=0, step=1, label="steps (0: the pipeline's own)")
                guidance = gr.Slider(1.0, 8.0, value=1.0, step=0.5, label="guidance")
                num_images = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images per pipeline")
            go = gr.Button("Generate", variant="primary")
            slots = []
            for i in range(MAX_ROWS):
                with gr.Column(elem_id=f"row-{i}", elem_classes="compare-row"):
                    slots.append(gr.Markdown(visible=False, elem_classes="row-label"))
                    slots.append(gr.Gallery(visible=False, interactive=False, show_label=False, columns=8,
                                            height="auto", object_fit="contain", allow_preview=True, format="png",
                                            fit_columns=False))
            firsts = gr.State({})
            with gr.Row():
                left = gr.Dropdown(names, value=names[0] if names else None, allow_custom_value=True,
                                   label="slider: left")
                right = gr.Dropdown(names, value=names[1] if len(names) > 1 else None, allow_custom_value=True,
                                    label="slider: right")
                show = gr.Button("Compare two")
            slider = gr.ImageSlider(label="left | right", interactive=False, format="png", elem_id="slider")
            go.click(_generate, [chosen, class_label, prompt, seed, steps, guidance, num_images], [*slots, firsts],
                     api_name="generate")
            show.click(_slider, [firsts, left, right], slider, api_name="slider")
        with gr.Tab("FID board"):
            with gr.Row():
                sources = gr.Dropdown([], multiselect=True, label="sources (none: all)")
                methods = gr.Dropdown([], multiselect=True, label="methods (none: all)")
                refresh = gr.Button("Refresh", scale=0)
            table = gr.Dataframe(headers=BOARD_COLUMNS, interactive=False)
            with gr.Row():
                plot_nfe = gr.Plot(label="FID vs NFE")
                plot_speed = gr.Plot(label="FID vs images/s")
            with gr.Row():
                fid_pipe = gr.Dropdown(names, value=names[0] if names else None, allow_custom_value=True,
                                       label="pipeline")
                per_class = gr.Number(value=20, precision=0, label=f"images per class (at most {MAX_PER_CLASS})")
                fid_go = gr.Button("Compute FID")
            fid_out = gr.Textbox(label="result")
            board_out = [table, plot_nfe, plot_speed, sources, methods]
            refresh.click(_board, [sources, methods], board_out, api_name="fid_board")
            sources.input(_board, [sources, methods], board_out, api_name=False)
            methods.input(_board, [sources, methods], board_out, api_name=False)
            demo.load(_board, [sources, methods], board_out, api_name=False)
            fid_go.click(_fid, [fid_pipe, per_class], fid_out, api_name="compute_fid")
        with gr.Tab("Jobs"):
            gr.Markdown(f"Jobs run the `dstudio` command line in a fresh folder under `{studio.runs / 'app'}`. "
                        f"**{concurrency} job{'s' if concurrency > 1 else ''} at a time**; the others wait in the "
                        f"queue, at most {max_jobs} queued or running. Folders typed here must lie in the runs "
                        "folder or a `--teacher` folder; relative ones start from the runs folder.")
            with gr.Row():
                method = gr.Dropdown(distillers + ["search"], value="dmd2" if "dmd2" in distillers else distillers[0],
                                     label="method (search: AutoDiffusion time steps)")
                teacher = gr.Textbox(label="teacher folder (empty: the shipped teacher)", elem_id="job-teacher")
                preset = gr.Dropdown(["quick", "full"], value="quick", allow_custom_value=True,
                                     label="preset (or a YAML file in the runs folder)")
                job_steps = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_JOB_STEPS,
                                      label="steps (distill: 0 = the preset's; search: NFE)")
            overrides = gr.Textbox(lines=2, label="--set overrides, one KEY=VALUE a line (e.g. method.lr=2e-4)",
                                   elem_id="job-overrides")
            with gr.Row():
                start = gr.Button("Start", variant="primary")
                job_id = gr.Number(value=None, precision=0, label="job (the queue's number)")
                cancel = gr.Button("Cancel job")
            status = gr.Textbox(label="progress", lines=2, elem_id="job-status")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="value", color="loss", label="loss (log.jsonl)", height=300)
                grid = gr.Image(label="latest sample grid", interactive=False, elem_id="job-grid", height=300,
                                format="png")
            jobs = gr.Dataframe(headers=["job", "state", "command", "run folder"], interactive=False, label="queue")
            view = [status, loss_plot, grid, jobs]
            dropdowns = [chosen, left, right, fid_pipe, unavailable]
            start.click(_job, [method, teacher, preset, job_steps, overrides], [*view, job_id, *dropdowns],
                        api_name="start_job", concurrency_limit=None)
            cancel.click(_cancel, job_id, view, api_name="cancel_job")
            jobs_timer = gr.Timer(2.0)
            jobs_timer.tick(lambda: studio.queue.table(), None, jobs, api_name=False, show_progress="hidden")
        rescan.click(_rescan, None, dropdowns, api_name="rescan")
    demo.queue(default_concurrency_limit=2)
    demo.studio = studio
    return demo


def launch(port: int = 7860, runs: str | Path | None = "runs", share: bool = False, block: bool = True,
           host: str = "127.0.0.1", auth: tuple[str, str] | None = None, teachers: tuple = ()):
    """Serve on 127.0.0.1 unless `host` is given; another host needs `auth` (checked by the CLI)."""
    if host not in ("127.0.0.1", "localhost") and auth is None:
        raise ValueError(f"serving on {host} needs auth=(user, password)")
    demo = build_app(runs, teachers)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, show_error=True,
                auth=auth, css=CSS)
    return demo
