"""`dstudio app`: the studio in the browser (Gradio Blocks). Compare pipelines side by side on the same noise,
browse every FID result, compute FID for a pipeline, and start quick distillations or searches from the page.

Every method and search result appears through the registries and the run folders: no app code per method.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dstudio.app.benchmark import ROOT

MAX_STEPS = 1000


@dataclass
class Entry:
    """One pipeline the app can sample: the teacher, an exported student, or the teacher with a saved schedule."""

    name: str
    path: Path
    kind: str                     # "teacher", "student" or "schedule"
    scheduler_dir: Path | None = None
    error: str | None = None      # why it is unavailable
    _pipe: object = None

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


def discover(runs: str | Path | None) -> list[Entry]:
    """The shipped teacher, then every pipeline folder and saved schedule under `runs` (unloadable ones included,
    with the reason they cannot be used)."""
    from dstudio.distill.core.teacher import DEFAULT_TEACHER

    entries = [Entry("teacher", DEFAULT_TEACHER, "teacher")]
    if runs is None or not Path(runs).is_dir():
        return entries
    root = Path(runs)
    for index in sorted(root.rglob("model_index.json")):
        folder = index.parent
        entries.append(Entry(str(folder.relative_to(root)), folder, "student"))
    for config in sorted(root.rglob("scheduler_config.json")):
        folder = config.parent
        if (folder.parent / "model_index.json").is_file():
            continue  # a pipeline's own scheduler
        entries.append(Entry(f"teacher + {folder.relative_to(root)}", DEFAULT_TEACHER, "schedule", folder))
    for e in entries[1:]:
        try:
            e.pipeline()
        except Exception as err:  # listed as unavailable with its reason; the rest still works
            e.error = str(err).splitlines()[0] if str(err) else type(err).__name__
    return entries


def _check(condition: bool, message: str) -> None:
    import gradio as gr

    if not condition:
        raise gr.Error(message)


def generate(entries: list[Entry], names: list[str], class_label: int | None, prompt: str, seed: int, steps: int,
             guidance: float, num_images: int = 4):
    """The same noise through each chosen pipeline: [(PIL image, caption)], captions naming method, NFE, ms/image."""
    by_name = {e.name: e for e in entries}
    _check(bool(names), "choose at least one pipeline")
    _check(0 <= int(steps) <= MAX_STEPS, f"steps {steps} is outside 0..{MAX_STEPS} (0: the pipeline's own default)")
    _check(1 <= int(num_images) <= 16, f"images per pipeline {num_images} is outside 1..16")
    gallery = []
    for name in names:
        e = by_name.get(name)
        _check(e is not None, f"unknown pipeline '{name}'")
        _check(e.available, f"pipeline '{name}' is unavailable: {e.error}")
        pipe = e.pipeline()
        kwargs = {"num_inference_steps": int(steps) or None, "guidance_scale": float(guidance), "output_type": "pil"}
        unet = pipe.unet
        text = hasattr(pipe, "tokenizer")
        if text:
            _check(bool(prompt.strip()), f"pipeline '{name}' is text-to-image: give a prompt")
            kwargs["prompt"] = [prompt] * int(num_images)
        else:
            n_cls = (unet.config.num_class_embeds or 1) - 1
            if n_cls > 0:
                label = 0 if class_label is None else int(class_label)
                _check(0 <= label < n_cls, f"class {label} is outside this pipeline's classes 0..{n_cls - 1}")
                kwargs["class_labels"] = torch.full((int(num_images),), label)
            else:
                kwargs["batch_size"] = int(num_images)
        size = unet.config.sample_size
        shape = (int(num_images), unet.config.in_channels, size, size)
        kwargs["latents"] = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
        kwargs["generator"] = torch.Generator().manual_seed(int(seed) + 1)
        if kwargs["num_inference_steps"] is None:
            kwargs.pop("num_inference_steps")
        t0 = time.perf_counter()
        with torch.no_grad():
            images = pipe(**kwargs).images
        ms = (time.perf_counter() - t0) * 1000 / len(images)
        nfe = len(pipe.scheduler.timesteps)
        method = _method(e)
        for img in images:
            gallery.append((img.resize((img.width * 4, img.height * 4), 0) if img.width < 64 else img,
                            f"{name} · {method} · {nfe} NFE · {ms:.1f} ms/image"))
    return gallery


def _method(e: Entry) -> str:
    info = e.path / "dstudio.json"
    if e.kind != "student":
        return {"teacher": "teacher", "schedule": "searched schedule"}[e.kind]
    if info.is_file():
        try:
            return json.loads(info.read_text()).get("method") or e.kind
        except json.JSONDecodeError:
            pass
    return e.kind


def fid_rows(runs: str | Path | None) -> list[dict]:
    """Every FID row of the result JSONs under --runs and benchmarks/results."""
    from dstudio.app.report import _load

    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if runs is not None and Path(runs).is_dir():
        files += sorted(p for p in Path(runs).rglob("*.json") if p.name in ("eval.json",) or p.parent.name == "fid")
    rows = []
    for f in files:
        try:
            section = _load(str(f))
        except Exception:
            continue
        for r in section["rows"]:
            if r.get("fid") is None:
                continue
            rows.append({"source": f.stem if f.name != "eval.json" else f.parent.name, "row": r.get("name"),
                         "nfe": r.get("nfe"), "fid": round(float(r["fid"]), 5),
                         "images_per_s": round(float(r["images_per_s"]), 1) if r.get("images_per_s") else None})
    return rows


def fid_plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for source in dict.fromkeys(r["source"] for r in rows):
        pts = [r for r in rows if r["source"] == source and r["nfe"]]
        if pts:
            a.scatter([r["nfe"] for r in pts], [r["fid"] for r in pts], label=source, s=14)
        sp = [r for r in pts if r["images_per_s"]]
        if sp:
            b.scatter([r["images_per_s"] for r in sp], [r["fid"] for r in sp], label=source, s=14)
    a.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID", title="FID vs NFE")
    b.set(xscale="log", yscale="log", xlabel="images/s", ylabel="FID", title="FID vs speed")
    a.legend(fontsize=6)
    fig.tight_layout()
    return fig


def compute_fid(entry: Entry, per_class: int, progress=None) -> dict:
    """FID-mnist of a class-conditional pipeline on the protocol's noise (per_class images per class)."""
    from dstudio.app.benchmark import pipeline_images, protocol_labels, protocol_noise
    from dstudio.app.fid import feature_space, fid_of_tensor, mnist_reference

    _check(entry.available, f"pipeline '{entry.name}' is unavailable: {entry.error}")
    _check(1 <= int(per_class) <= 500, f"images per class {per_class} is outside 1..500")
    pipe = entry.pipeline()
    _check(bool(pipe.unet.config.get("num_class_embeds")), "FID here is for class-conditional (MNIST) pipelines")
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    labels = protocol_labels(per_class=int(per_class))
    noise = protocol_noise(shape, len(labels))
    step = (lambda f: progress(f, desc=f"sampling {entry.name}")) if progress is not None else None
    with torch.no_grad():
        images, seconds = pipeline_images(pipe, labels, noise, None, batch_size=100, progress=step)
    if progress is not None:
        progress(1.0, desc="features and FID")
    space = feature_space("mnist", "cpu")
    result = fid_of_tensor(images, mnist_reference(space, shape[-1]), space, entry.name)
    return {"pipeline": entry.name, "fid": result["fid"], "images": len(images), "images_per_s": len(images) / seconds}


class Job:
    """A `dstudio` run started from the page: the same command and run folder as on the command line."""

    def __init__(self, argv: list[str], run_dir: Path):
        self.argv, self.run_dir = argv, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(run_dir / "app-job.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "dstudio.app.cli", *argv], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)

    def status(self) -> tuple[str, str | None]:
        """A line of progress and the latest sample grid."""
        log = self.run_dir / "log.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        grids = sorted((self.run_dir / "samples").glob("*.png")) if (self.run_dir / "samples").is_dir() else []
        grids += [self.run_dir / "search.png"] if (self.run_dir / "search.png").is_file() else []
        if lines:
            last = json.loads(lines[-1])
            text = f"step {last.get('step', 0)}" + "".join(f", {k.split('/')[-1]} {v:.4g}" for k, v in last.items()
                                                            if k not in ("step", "time") and isinstance(v, float))
        else:  # the command's own progress line (pair generation, search generations)
            self.log.flush()
            out = (self.run_dir / "app-job.log").read_text().replace("\r", "\n").splitlines()
            text = next((line.strip() for line in reversed(out) if line.strip()), "starting")
        return text[:200], str(grids[-1]) if grids else None

    def error(self) -> str | None:
        """The run's one-line error, if it failed."""
        if self.proc.poll() in (None, 0):
            return None
        self.log.flush()
        tail = [line for line in (self.run_dir / "app-job.log").read_text().replace("\r", "\n").splitlines()
                if line.startswith("dstudio: error:")]
        return tail[-1] if tail else f"the run stopped with exit code {self.proc.returncode}"

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def job_argv(kind: str, method: str, preset: str, nfe: int, out: Path) -> list[str]:
    if kind == "search":
        return ["search", "--nfe", str(int(nfe)), "--population", "8", "--generations", "3", "--num-samples", "200",
                "--out", str(out)]
    return ["distill", method, "--preset", preset, "--out", str(out), "--eval-per-class", "0"]


def build_app(runs: str | Path | None = "runs"):
    """The Blocks app; each event has an api_name so gradio_client (and scripts) can call it."""
    import gradio as gr

    from dstudio.distill.core.method import METHODS, get_method

    get_method("ddpm")  # registers every method
    entries = discover(runs)
    names = [e.name for e in entries if e.available]
    unavailable = [f"- `{e.name}`: {e.error}" for e in entries if not e.available]
    distillers = sorted(n for n, c in METHODS.items() if c.is_distiller)

    def _generate(chosen, class_label, prompt, seed, steps, guidance, num_images):
        label = None if class_label is None or class_label == "" else int(class_label)
        return generate(entries, chosen or [], label, prompt or "", int(seed), int(steps), float(guidance),
                        int(num_images))

    def _slider(gallery, left, right):
        firsts = {}
        for item in gallery or []:
            img, caption = (item["image"], item.get("caption")) if isinstance(item, dict) else item
            firsts.setdefault((caption or "").split(" · ")[0], img)
        _check(left in firsts and right in firsts, "generate images of both pipelines first")
        pick = lambda x: x.get("path") if isinstance(x, dict) else x  # noqa: E731
        return (pick(firsts[left]), pick(firsts[right]))

    def _board():
        rows = fid_rows(runs)
        header = ["source", "row", "nfe", "fid", "images_per_s"]
        return [[r[h] for h in header] for r in rows], fid_plot(rows)

    def _fid(name, per_class, progress=gr.Progress()):
        entry = next((e for e in entries if e.name == name), None)
        _check(entry is not None, f"unknown pipeline '{name}'")
        r = compute_fid(entry, int(per_class), progress)
        return f"{r['pipeline']}: FID-mnist {r['fid']:.4f} on {r['images']} images, {r['images_per_s']:.0f} images/s"

    def _job(kind, method, preset, nfe):
        out = Path(runs or "runs").resolve() / "app" / f"{kind if kind == 'search' else method}-{time.strftime('%Y%m%d-%H%M%S')}"
        job = Job(job_argv(kind, method, preset, nfe, out), out)
        try:
            while job.proc.poll() is None:
                yield (f"running: dstudio {' '.join(job.argv)}\n{job.status()[0]}", job.status()[1])
                time.sleep(1.0)
            err = job.error()
            if err:
                raise gr.Error(err)
            yield (f"done: {out}\n{job.status()[0]}", job.status()[1])
        finally:
            job.cancel()  # a cancelled event (or a closed page) stops the run too

    with gr.Blocks(title="dstudio") as demo:
        gr.Markdown("# dstudio\nTeacher, students and searched schedules side by side on the same noise.")
        if unavailable:
            gr.Markdown("**Unavailable pipelines**\n" + "\n".join(unavailable))
        with gr.Tab("Compare"):
            with gr.Row():
                chosen = gr.Dropdown(names, value=names[:3], multiselect=True, label="pipelines")
                class_label = gr.Number(value=3, precision=0, label="class (class-conditional pipelines)")
                prompt = gr.Textbox(label="prompt (text-to-image pipelines)")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed")
                steps = gr.Slider(0, 100, value=0, step=1, label="steps (0: the pipeline's own)")
                guidance = gr.Slider(1.0, 8.0, value=1.0, step=0.5, label="guidance")
                num_images = gr.Slider(1, 16, value=4, step=1, label="images per pipeline")
            go = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="samples", columns=8, height="auto", elem_id="gallery")
            with gr.Row():
                left = gr.Dropdown(names, value=names[0] if names else None, label="slider: left")
                right = gr.Dropdown(names, value=names[1] if len(names) > 1 else None, label="slider: right")
                show = gr.Button("Compare two")
            slider = gr.ImageSlider(label="left | right")
            go.click(_generate, [chosen, class_label, prompt, seed, steps, guidance, num_images], gallery,
                     api_name="generate")
            show.click(_slider, [gallery, left, right], slider, api_name="slider")
        with gr.Tab("FID board"):
            refresh = gr.Button("Refresh")
            table = gr.Dataframe(headers=["source", "row", "nfe", "fid", "images_per_s"], interactive=False)
            plot = gr.Plot()
            with gr.Row():
                fid_pipe = gr.Dropdown(names, value=names[0] if names else None, label="pipeline")
                per_class = gr.Number(value=20, precision=0, label="images per class")
                fid_go = gr.Button("Compute FID")
            fid_out = gr.Textbox(label="result")
            refresh.click(_board, None, [table, plot], api_name="fid_board")
            demo.load(_board, None, [table, plot])
            fid_go.click(_fid, [fid_pipe, per_class], fid_out, api_name="compute_fid")
        with gr.Tab("Distill and Search"):
            with gr.Row():
                kind = gr.Radio(["distill", "search"], value="distill", label="job")
                method = gr.Dropdown(distillers, value="dmd2" if "dmd2" in distillers else distillers[0], label="method")
                preset = gr.Dropdown(["quick", "full"], value="quick", label="preset (or a YAML file)",
                                     allow_custom_value=True)
                nfe = gr.Number(value=4, precision=0, label="search: NFE")
            with gr.Row():
                start = gr.Button("Start", variant="primary")
                cancel = gr.Button("Cancel")
            status = gr.Textbox(label="progress", lines=2)
            grid = gr.Image(label="latest samples")
            run_event = start.click(_job, [kind, method, preset, nfe], [status, grid], api_name="start_job")
            cancel.click(None, None, None, cancels=[run_event])
    demo.queue(default_concurrency_limit=2)
    return demo


def launch(port: int = 7860, runs: str | Path | None = "runs", share: bool = False, block: bool = True):
    demo = build_app(runs)
    demo.launch(server_name="127.0.0.1", server_port=port, share=share, prevent_thread_lock=not block, show_error=True)
    return demo
