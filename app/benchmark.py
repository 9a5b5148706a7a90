"""The harness every script in benchmarks/ uses: the stock solvers they compare against, results/NAME.json with
machine and versions, the RESULTS.md tables and the FID-vs-NFE plot. The protocol itself (labels, noise, reference,
floor) is dstudio.distill.evaluation.protocol."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from dstudio.app.schedulers import STOCK_SCHEDULERS

ROOT = Path(__file__).resolve().parents[1]
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


def machine() -> dict:
    """The platform, processor, core and thread counts and the GPU a result was measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def stock_scheduler(name: str, base_config):
    """The stock solver `name` of STOCK_SOLVERS, built on a pipeline's scheduler config."""
    import diffusers

    cls, overrides = STOCK_SOLVERS[name]
    return getattr(diffusers, cls).from_config(base_config, **overrides)


def source_commit() -> str | None:
    """The checkout's commit (short; `+dirty` with uncommitted changes to tracked files other than the benchmark
    results and the docs), or None outside git."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
                    ":!*.md").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else None


def trained_at(run: Path) -> str | None:
    """When the pipeline in `run` (a run folder or a pipeline folder) was exported: its dstudio.json `created` date, so
    a row that evaluates an earlier run again (`--reuse`) still says when that run was trained; None without one."""
    from dstudio.distill.core.export import read_provenance

    return read_provenance(Path(run) / "pipeline").get("created") or read_provenance(run).get("created")


def merge_rows(rows: list[dict], old: list[dict], date: str | None, key, commit: str | None = None) -> list[dict]:
    """This run's rows, then an earlier file's rows of every run (`key(row)`) not measured again, each keeping its
    `measured` date and `commit` (and its speed ratio, taken within its own run)."""
    fresh = {key(r) for r in rows}
    return rows + [{"measured": r.get("measured", date), "commit": r.get("commit", commit), **r}
                   for r in old if key(r) not in fresh]


def write_results(name: str, payload: dict, path: Path | None = None) -> dict:
    """Write results/NAME.json (or `path`) with date, machine and versions, and rebuild RESULTS.md; the payload.
    Rows keep their FID intervals (`KEY_ci95`) and bootstrap replicates (`KEY_boot`, for paired comparisons);
    `payload["fingerprint"]` (space -> protocol fingerprint) names what produced them."""
    from dstudio.distill.core.export import versions
    from dstudio.distill.core.io import save_json

    commit = payload.pop("commit", None) or source_commit()  # a long benchmark names the commit it started at
    payload = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "versions": versions(), "commit": commit, **payload}
    for row in payload.get("rows", []):  # rows of an earlier run (`measured`) keep the commit they had
        if "measured" not in row:
            row["commit"] = commit
    path = Path(path) if path else RESULTS / f"{name}.json"
    save_json(payload, path)
    if path.resolve().parent == RESULTS.resolve():
        refresh_results_md()
    return payload


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def cell(row: dict, key: str) -> str:
    """A table cell: the value, and for a figure with an interval (`KEY_ci95`) `0.081 [0.075, 0.089]`."""
    ci = row.get(f"{key}_ci95")
    return _fmt(row.get(key)) + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci and row.get(key) is not None else "")


def rows_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r, key) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


DEFAULT_COLUMNS = [("name", "row"), ("nfe", "NFE"), ("fid", "FID-mnist"), ("fid_vs_teacher", "x teacher-50"),
                   ("images_per_s", "images/s"), ("speedup", "speed-up vs teacher-50")]


def refresh_results_md() -> Path:
    """Rebuild benchmarks/RESULTS.md from every results/*.json (each names its command and columns)."""
    from dstudio.distill.core.io import atomic_path
    from dstudio.distill.evaluation.fingerprint import describe

    parts = ["# Benchmark results", "",
             "Made by the scripts in `benchmarks/` (protocol in `benchmarks/README.md`); each section names the "
             "command that wrote it. Regenerated from `benchmarks/results/*.json`. An FID cell "
             "`0.081 [0.075, 0.089]` carries its 95% bootstrap interval over the generated images; rows without one "
             "were measured before intervals were recorded. Rows whose intervals do not overlap differ at 95%; for "
             "overlapping ones, the app's FID board applies the paired test of rows drawn from the same noise.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        parts += [f"## {r['benchmark']}", "",
                  f"`{r.get('command', '')}` — {r['date']}, {r['machine']['processor']}, "
                  f"{r['machine']['torch_threads']} torch threads, torch {r['versions']['torch']}", ""]
        if r.get("floor") is not None:
            parts += [f"Real-vs-real floor (FID-mnist, 2,000 vs 5,000): {r['floor']:.4g}", ""]
        for space, fp in (r.get("fingerprint") or {}).items():
            parts += [f"Protocol fingerprint ({space}): {describe(fp)}", ""]
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
