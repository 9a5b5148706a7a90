"""The FID board's model: every FID row of the benchmark results and of the runs, filters, the Pareto front of
FID against speed, the plotly figures, and "Compute FID" of one pipeline on the protocol's noise."""
from __future__ import annotations

import math
from pathlib import Path

from dstudio.app.studio.safety import check

MAX_PER_CLASS = 500       # images per class for "Compute FID"
BOARD_COLUMNS = ["source", "method", "row", "nfe", "fid", "images_per_s"]


def _run_method(eval_json: Path) -> str | None:
    """The method named in the run's config.yaml beside an eval.json."""
    import yaml

    config = eval_json.parent / "config.yaml"
    if eval_json.name != "eval.json" or not config.is_file():
        return None
    try:
        return (yaml.safe_load(config.read_text()) or {}).get("method_name")
    except yaml.YAMLError:
        return None


def _board_row(r: dict, f: Path, run_method: str | None) -> dict:
    """One board row from a result row of file `f`."""
    method = r.get("method") or r.get("sampler") or (run_method if r.get("name") == "student" else None)
    return {"source": f.stem if f.name != "eval.json" else f.parent.name, "method": method or r.get("name") or "-",
            "row": r.get("name"), "nfe": r.get("nfe"), "fid": round(float(r["fid"]), 5),
            "images_per_s": round(float(r["images_per_s"]), 1) if r.get("images_per_s") else None}


def fid_rows(runs: str | Path | None) -> list[dict]:
    """Every FID row of the result JSONs under benchmarks/results and of the eval.json / fid/*.json under --runs."""
    from dstudio.app.benchmark import RESULTS
    from dstudio.app.report import load_section

    files = sorted(RESULTS.glob("*.json"))
    if runs is not None and Path(runs).is_dir():
        files += sorted(p for p in Path(runs).rglob("*.json") if p.name == "eval.json" or p.parent.name == "fid")
    rows = []
    for f in files:
        try:
            section = load_section(str(f))
        except Exception:
            continue
        run_method = _run_method(f)
        rows += [_board_row(r, f, run_method) for r in section["rows"] if r.get("fid") is not None]
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


def _front_trace(rows: list[dict]):
    """The Pareto front as a black step line through its rows, each named."""
    import plotly.graph_objects as go

    front = pareto_front(rows)
    return go.Scatter(x=[r["images_per_s"] for r in front], y=[r["fid"] for r in front],
                      mode="lines+markers+text", name="Pareto front", line={"shape": "hv", "color": "black"},
                      marker={"symbol": "circle-open", "size": 12, "color": "black"},
                      text=[r["row"] for r in front], textposition="top right",
                      hovertext=[_hover(r) for r in front], hoverinfo="text")


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
    by_speed.add_trace(_front_trace(rows))
    for fig, title, x in ((by_nfe, "FID vs NFE", "NFE"), (by_speed, "FID vs speed (Pareto front: black)", "images/s")):
        fig.update_layout(title=title, xaxis={"type": "log", "title": x}, yaxis={"type": "log", "title": "FID"},
                          height=420, margin={"l": 50, "r": 10, "t": 40, "b": 40}, legend={"font": {"size": 9}})
    return by_nfe, by_speed


def compute_fid(entry, per_class: int, progress=None) -> dict:
    """FID-mnist and FID-pixels of a pixel-space pipeline (class-conditional or not) on the protocol's noise
    (per_class images per class) with their intervals, its images/s and its report card: the end-of-run
    comparison's row."""
    from dstudio.distill.evaluation.compare import measure, references
    from dstudio.distill.evaluation.protocol import protocol_inputs

    check(entry.available, f"pipeline '{entry.name}' is unavailable: {entry.error}")
    check(1 <= int(per_class) <= MAX_PER_CLASS, f"images per class {per_class} is outside 1..{MAX_PER_CLASS}")
    pipe = entry.pipeline()
    check(not hasattr(pipe, "tokenizer"), "FID here is for pixel-space (MNIST) pipelines, not text-to-image ones")
    labels, noise = protocol_inputs(pipe, int(per_class))
    step = (lambda f: progress(f, desc=f"sampling {entry.name}")) if progress is not None else None
    row, card = measure(entry.name, pipe, None, labels, noise, references(noise.shape[-1]), batch_size=100,
                        progress=step)
    return {**row, "images": len(labels), "card": card}
