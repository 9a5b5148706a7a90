"""The page (Gradio Blocks): a Compare tab, an FID board and a Jobs tab over one Studio. Each event has an API
name, so gradio_client (and scripts) can call it; each tab is built by its own function."""
from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

from dstudio.app.studio.board import BOARD_COLUMNS, MAX_PER_CLASS, compute_fid, fid_figures, fid_rows, filter_rows, \
    mark_not_significant
from dstudio.app.studio.compare import MAX_IMAGES, MAX_ROWS, MAX_STEPS, readable
from dstudio.app.studio.jobs import JOB_CONCURRENCY, MAX_JOBS, Job, loss_curves
from dstudio.app.studio.safety import check
from dstudio.app.studio.state import MAX_JOB_STEPS, Studio

GALLERY_LINE = 152        # pixels per line of 8 images in a Compare row (at a 1280 px wide window)
CSS = """.compare-row img, #job-grid img {image-rendering: pixelated}
.row-label p {font-family: ui-monospace, monospace; font-size: 15px; margin: 0}"""


def _unavailable(studio: Studio) -> str:
    bad = [f"- `{e.name}`: {e.error}" for e in studio.entries if not e.available]
    return "**Unavailable pipelines**\n" + "\n".join(bad) if bad else ""


def _choices(studio: Studio):
    """Updates for every pipeline dropdown after a rescan (the current choice kept where it still exists)."""
    import gradio as gr

    now = studio.names()
    return (*(gr.Dropdown(choices=now) for _ in range(4)), _unavailable(studio))


def _rescan(studio: Studio):
    """Look for new pipelines; the dropdowns' updates."""
    studio.rescan()
    return _choices(studio)


def _row_outputs(rows) -> list:
    """The label and gallery of each of the MAX_ROWS slots: the rows shown, the other slots hidden."""
    import gradio as gr

    out = []
    for i in range(MAX_ROWS):
        if i < len(rows):
            r = rows[i]
            out += [gr.Markdown(r.label(rows[0]), visible=True),
                    gr.Gallery(r.images, visible=True, height=GALLERY_LINE * math.ceil(len(r.images) / 8) + 24)]
        else:
            out += [gr.Markdown("", visible=False), gr.Gallery(None, visible=False)]
    return out


def _compare_tab(studio: Studio, names: list[str]) -> SimpleNamespace:
    """Pipelines row by row on the same noise, and an image slider between the first images of two rows."""
    import gradio as gr

    def generate(chosen, class_label, prompt, seed, steps, guidance, num_images):
        label = None if class_label is None or class_label == "" else int(class_label)
        rows = studio.compare(chosen or [], label, prompt or "", int(seed), int(steps), float(guidance),
                              int(num_images))
        return *_row_outputs(rows), {r.name: r.images[0] for r in rows}

    def slider(firsts, left, right):
        firsts = firsts or {}
        check(left in firsts and right in firsts, "generate images of both pipelines first")
        return (firsts[left], firsts[right])

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
            slots.append(gr.Gallery(visible=False, interactive=False, show_label=False, columns=8, height="auto",
                                    object_fit="contain", allow_preview=True, format="png", fit_columns=False))
    firsts = gr.State({})
    with gr.Row():
        left = gr.Dropdown(names, value=names[0] if names else None, allow_custom_value=True, label="slider: left")
        right = gr.Dropdown(names, value=names[1] if len(names) > 1 else None, allow_custom_value=True,
                            label="slider: right")
        show = gr.Button("Compare two")
    shown = gr.ImageSlider(label="left | right", interactive=False, format="png", elem_id="slider")
    go.click(generate, [chosen, class_label, prompt, seed, steps, guidance, num_images], [*slots, firsts],
             api_name="generate")
    show.click(slider, [firsts, left, right], shown, api_name="slider")
    return SimpleNamespace(chosen=chosen, left=left, right=right, rescan=rescan)


def _board_tab(studio: Studio, names: list[str], demo) -> SimpleNamespace:
    """Every FID result as a filterable table and two plots, and "Compute FID" of one pipeline."""
    import gradio as gr

    from dstudio.distill.evaluation.card import K
    from dstudio.distill.evaluation.compare import SPACES, fids_text

    def board(sources=None, methods=None):
        rows = fid_rows(studio.runs)
        shown = mark_not_significant(filter_rows(rows, sources, methods))
        by_nfe, by_speed = fid_figures(shown)
        return ([[r[h] for h in BOARD_COLUMNS] for r in shown], by_nfe, by_speed,
                gr.Dropdown(choices=list(dict.fromkeys(r["source"] for r in rows))),
                gr.Dropdown(choices=sorted({r["method"] for r in rows})))

    def fid(name, per_class, progress=gr.Progress()):
        r = compute_fid(studio.entry(name), int(per_class), progress)
        card = r["card"][SPACES[0]]
        pr = "" if card["precision"] is None else \
            f"; precision {card['precision']:.2f}, recall {card['recall']:.2f} ({SPACES[0]}, k={K})"
        return (f"{r['name']}: {fids_text(r, list(SPACES))} on {r['images']} images, "
                f"{r['images_per_s']:.0f} images/s{pr}")

    with gr.Row():
        sources = gr.Dropdown([], multiselect=True, label="sources (none: all)")
        methods = gr.Dropdown([], multiselect=True, label="methods (none: all)")
        refresh = gr.Button("Refresh", scale=0)
    table = gr.Dataframe(headers=BOARD_COLUMNS, interactive=False)
    with gr.Row():
        plot_nfe = gr.Plot(label="FID vs NFE")
        plot_speed = gr.Plot(label="FID vs images/s")
    with gr.Row():
        fid_pipe = gr.Dropdown(names, value=names[0] if names else None, allow_custom_value=True, label="pipeline")
        per_class = gr.Number(value=20, precision=0, label=f"images per class (at most {MAX_PER_CLASS})")
        fid_go = gr.Button("Compute FID")
    fid_out = gr.Textbox(label="result")
    board_out = [table, plot_nfe, plot_speed, sources, methods]
    refresh.click(board, [sources, methods], board_out, api_name="fid_board")
    sources.input(board, [sources, methods], board_out, api_name=False)
    methods.input(board, [sources, methods], board_out, api_name=False)
    demo.load(board, [sources, methods], board_out, api_name=False)
    fid_go.click(fid, [fid_pipe, per_class], fid_out, api_name="compute_fid")
    return SimpleNamespace(fid_pipe=fid_pipe)


def _job_view(studio: Studio, job: Job):
    """The job's progress line, loss curves, latest sample grid, and the queue."""
    import pandas as pd
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


def _jobs_form(studio: Studio, distillers: list[str]) -> list:
    """The form's inputs: method, teacher folder, preset, steps, overrides."""
    import gradio as gr

    with gr.Row():
        method = gr.Dropdown(distillers + ["search"], value="dmd2" if "dmd2" in distillers else distillers[0],
                             label="method (search: AutoDiffusion time steps)")
        teacher = gr.Textbox(label="teacher folder (empty: the shipped teacher)", elem_id="job-teacher")
        preset = gr.Dropdown(["quick", "full"], value="quick", allow_custom_value=True,
                             label="preset (or a YAML file in the runs folder)")
        steps = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_JOB_STEPS,
                          label="steps (distill: 0 = the preset's; search: NFE)")
    overrides = gr.Textbox(lines=2, label="--set overrides, one KEY=VALUE a line (e.g. method.lr=2e-4)",
                           elem_id="job-overrides")
    return [method, teacher, preset, steps, overrides]


def _jobs_tab(studio: Studio, distillers: list[str], dropdowns: list, concurrency: int, max_jobs: int) -> None:
    """A form that queues `dstudio distill` or a small `dstudio search`, and a live view of the job."""
    import gradio as gr

    def start_job(method, teacher, preset, steps, overrides):
        job = studio.submit(method, teacher or "", preset or "", int(steps or 0), overrides or "")
        while job.active:
            yield (*_job_view(studio, job), job.number, *[gr.skip()] * len(dropdowns))
            time.sleep(1.0)
        if job.error():
            raise gr.Error(job.error())
        yield (*_job_view(studio, job), job.number, *_rescan(studio))

    def cancel_job(number):
        check(number is not None, "start a job first")
        job = studio.queue.get(int(number))
        studio.queue.cancel(job)
        return _job_view(studio, job)

    gr.Markdown(f"Jobs run the `dstudio` command line in a fresh folder under `{studio.runs / 'app'}`. "
                f"**{concurrency} job{'s' if concurrency > 1 else ''} at a time**; the others wait in the "
                f"queue, at most {max_jobs} queued or running. Folders typed here must lie in the runs "
                "folder or a `--teacher` folder; relative ones start from the runs folder.")
    form = _jobs_form(studio, distillers)
    with gr.Row():
        start = gr.Button("Start", variant="primary")
        job_id = gr.Number(value=None, precision=0, label="job (the queue's number)")
        cancel = gr.Button("Cancel job")
    status = gr.Textbox(label="progress", lines=2, elem_id="job-status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="loss", label="loss (log.jsonl)", height=300)
        grid = gr.Image(label="latest sample grid", interactive=False, elem_id="job-grid", height=300, format="png")
    jobs = gr.Dataframe(headers=["job", "state", "command", "run folder"], interactive=False, label="queue")
    view = [status, loss_plot, grid, jobs]
    start.click(start_job, form, [*view, job_id, *dropdowns], api_name="start_job", concurrency_limit=None)
    cancel.click(cancel_job, job_id, view, api_name="cancel_job")
    gr.Timer(2.0).tick(lambda: studio.queue.table(), None, jobs, api_name=False, show_progress="hidden")


def build_app(runs: str | Path | None = "runs", teachers: tuple = (), concurrency: int = JOB_CONCURRENCY,
              max_jobs: int = MAX_JOBS):
    """The Blocks app over one Studio; `demo.studio` is that Studio."""
    import gradio as gr

    from dstudio.distill.core.method import discover

    studio = Studio(runs or "runs", teachers, concurrency, max_jobs)
    names = studio.names()
    distillers = sorted(n for n, c in discover().items() if c.is_distiller)
    with gr.Blocks(title="dstudio") as demo:
        gr.Markdown("# dstudio\nTeacher, students and searched schedules row by row on the same noise.")
        unavailable = gr.Markdown(_unavailable(studio))
        with gr.Tab("Compare"):
            compare = _compare_tab(studio, names)
        with gr.Tab("FID board"):
            board = _board_tab(studio, names, demo)
        dropdowns = [compare.chosen, compare.left, compare.right, board.fid_pipe, unavailable]
        with gr.Tab("Jobs"):
            _jobs_tab(studio, distillers, dropdowns, concurrency, max_jobs)
        compare.rescan.click(lambda: _rescan(studio), None, dropdowns, api_name="rescan")
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
