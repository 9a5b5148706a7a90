"""The embedded benchmark protocol and the harness every script in benchmarks/ uses.

Protocol: 2,000 generated images (200 per class, fixed noise from seed 0) against MNIST-5k, FID in the
`mnist` feature space; the floor is 2,000 real MNIST-5k images (200 per class) against all of MNIST-5k.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The stock diffusers schedulers `dstudio sample --scheduler NAME` offers: name -> class.
STOCK_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Stock diffusers solvers every benchmark compares against: name -> (class, config overrides).
STOCK_SOLVERS = {
    "ddim": (STOCK_SCHEDULERS["ddim"], {"timestep_spacing": "trailing"}),
    "ddim-leading": (STOCK_SCHEDULERS["ddim"], {"timestep_spacing": "leading", "steps_offset": 0}),
    "dpmpp-2m": (STOCK_SCHEDULERS["dpmpp"], {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                             "timestep_spacing": "trailing"}),
    "unipc": (STOCK_SCHEDULERS["unipc"], {"timestep_spacing": "trailing"}),
    "euler": (STOCK_SCHEDULERS["euler"], {"timestep_spacing": "trailing"}),
}
RESULTS = ROOT / "benchmarks" / "results"
N_PER_CLASS = 200
NOISE_SEED = 0


def protocol_labels(num_classes: int = 10, per_class: int = N_PER_CLASS) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


def protocol_noise(shape: tuple[int, ...], n: int, seed: int = NOISE_SEED) -> torch.Tensor:
    """The same standard-normal starting noise for every row of every benchmark."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def timed(fn, *args, **kwargs):
    """(result, seconds), synchronising CUDA around the call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def pipeline_images(pipe, labels: torch.Tensor, noise: torch.Tensor, steps: int | None, batch_size: int = 500,
                    guidance_scale: float = 1.0, progress=None, **kwargs) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] from a class-conditional pipeline on fixed noise, and the wall time in seconds;
    `progress(fraction)` is called before each batch. Samplers that re-noise (few-step students) draw from a
    generator seeded per batch, so every figure is reproducible."""
    chunks, seconds = [], 0.0
    for i in range(0, len(labels), batch_size):
        if progress is not None:
            progress(i / len(labels))
        gen = torch.Generator(noise.device).manual_seed(NOISE_SEED + 1 + i)
        out, dt = timed(pipe, class_labels=labels[i:i + batch_size], latents=noise[i:i + batch_size],
                        num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt", generator=gen,
                        **kwargs)
        chunks.append(out.images * 2 - 1)
        seconds += dt
    return torch.cat(chunks), seconds


def stock_scheduler(name: str, base_config):
    import diffusers

    cls, overrides = STOCK_SOLVERS[name]
    return getattr(diffusers, cls).from_config(base_config, **overrides)


def real_floor(space, ref, resolution: int) -> dict:
    """Real-vs-real FID at the protocol's sizes: 200 real images per class (seeded) against all of MNIST-5k."""
    from dstudio.app.fid import fid_of_tensor
    from dstudio.distill.data import mnist5k

    data = mnist5k(resolution, seed=1)
    idx = torch.cat([(data.labels == c).nonzero()[:N_PER_CLASS, 0] for c in range(10)])
    return fid_of_tensor(data.images[idx], ref, space, "mnist5k-real-2000")


def protocol_for(pipe, per_class: int = N_PER_CLASS, floor: bool = True) -> dict:
    """The embedded protocol for a class-conditional pipeline: labels, fixed noise, feature space, reference and
    (with `floor`) the real-vs-real FID floor."""
    from dstudio.app.fid import feature_space, mnist_reference

    cfg = pipe.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    labels = protocol_labels(per_class=per_class)
    space = feature_space("mnist", "cpu")
    ref = mnist_reference(space, shape[-1])
    proto = {"labels": labels, "noise": protocol_noise(shape, len(labels)), "space": space, "ref": ref}
    if floor:
        proto["floor"] = real_floor(space, ref, shape[-1])["fid"]
    return proto


def merge_rows(rows: list[dict], old: list[dict], date: str | None, key) -> list[dict]:
    """This run's rows, then an earlier file's rows of every run (`key(row)`) not measured again, each keeping its
    `measured` date (and its speed ratio, taken within its own run)."""
    fresh = {key(r) for r in rows}
    return rows + [{"measured": r.get("measured", date), **r} for r in old if key(r) not in fresh]


def write_results(name: str, payload: dict, path: Path | None = None) -> dict:
    """Write results/NAME.json (or `path`) with date, machine and versions, and rebuild RESULTS.md; the payload."""
    from dstudio.distill.core.export import versions
    from dstudio.distill.core.io import save_json

    payload = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "versions": versions(), **payload}
    path = Path(path) if path else RESULTS / f"{name}.json"
    save_json(payload, path)
    if path.resolve().parent == RESULTS.resolve():
        refresh_results_md()
    return payload


def rows_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


DEFAULT_COLUMNS = [("name", "row"), ("nfe", "NFE"), ("fid", "FID-mnist"), ("fid_vs_teacher", "x teacher-50"),
                   ("images_per_s", "images/s"), ("speedup", "speed-up vs teacher-50")]


def refresh_results_md() -> Path:
    """Rebuild benchmarks/RESULTS.md from every results/*.json (each names its command and columns)."""
    from dstudio.distill.core.io import atomic_path

    parts = ["# Benchmark results", "",
             "Made by the scripts in `benchmarks/` (protocol in `benchmarks/README.md`); each section names the "
             "command that wrote it. Regenerated from `benchmarks/results/*.json`.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        parts += [f"## {r['benchmark']}", "",
                  f"`{r.get('command', '')}` — {r['date']}, {r['machine']['processor']}, "
                  f"{r['machine']['torch_threads']} torch threads, torch {r['versions']['torch']}", ""]
        if r.get("floor") is not None:
            parts += [f"Real-vs-real floor (FID-mnist, 2,000 vs 5,000): {r['floor']:.4g}", ""]
        cols = [tuple(c) for c in r.get("columns", DEFAULT_COLUMNS)]
        parts += [rows_table(r["rows"], cols), ""]
        for note in r.get("notes", []):
            parts.append(f"- {note}")
        if r.get("plot"):
            parts += ["", f"![{r['benchmark']}](results/{Path(r['plot']).name})"]  # plots sit beside their JSON
        parts.append("")
    out = RESULTS.parent / "RESULTS.md"
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
    return out


def fid_vs_nfe_plot(rows: list[dict], path: Path, title: str, floor: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dstudio.distill.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows if r.get("fid") is not None):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == sampler and r.get("fid") is not None)
        ax.plot(*zip(*pts), marker="o", label=sampler)
    if floor is not None:
        ax.axhline(floor, color="grey", ls="--", label="real-vs-real floor")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID-mnist (2,000 images)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
