"""The FID board's model: every FID row of the benchmark results and of the runs with its 95% interval, precision /
recall and the rows it does not differ from significantly, filters, the Pareto front of FID against speed, the
plotly figures, and "Compute FID" of one pipeline on the protocol's noise."""
from __future__ import annotations

import math
from pathlib import Path

from dstudio.app.studio.safety import check

MAX_PER_CLASS = 500       # images per class for "Compute FID"
BOARD_COLUMNS = ["source", "method", "row", "nfe", "fid", "fid_ci95", "precision", "recall", "images_per_s",
                 "not_significant_vs"]
MAX_NAMED = 6  # rows named in a not_significant_vs cell before "+N more"


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


def _rounded(v, digits: int) -> float | None:
    return None if v is None else round(float(v), digits)


def _row_fingerprint(r: dict, section: dict) -> dict | None:
    """The protocol fingerprint of a row's `fid`: its own result's, else its file's in the space `fid` is in."""
    fingerprints = r.get("fingerprint") or section.get("fingerprint") or {}
    space = r.get("features") or section.get("features") or next(iter(fingerprints), None)
    return fingerprints.get(space)


def _board_row(r: dict, f: Path, run_method: str | None, fingerprint: dict | None = None) -> dict:
    """One board row from a result row of file `f`; `figure` keeps what the significance rule reads."""
    method = r.get("method") or r.get("sampler") or (run_method if r.get("name") == "student" else None)
    ci = r.get("fid_ci95")
    return {"source": f.stem if f.name != "eval.json" else f.parent.name, "method": method or r.get("name") or "-",
            "row": r.get("name"), "nfe": r.get("nfe"), "fid": round(float(r["fid"]), 5),
            "fid_ci95": f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else None,
            "precision": _rounded(r.get("precision"), 3), "recall": _rounded(r.get("recall"), 3),
            "images_per_s": round(float(r["images_per_s"]), 1) if r.get("images_per_s") else None,
            "not_significant_vs": None,
            "figure": {k: r.get(k) for k in ("name", "fid", "fid_ci95", "fid_boot")}, "fingerprint": fingerprint}


def not_significant(a: dict, b: dict) -> bool:
    """Whether two board rows' FIDs are on one protocol (same fingerprint id) and do not differ at 95%: the paired
    bootstrap when both drew from the protocol's noise and kept their replicates, else non-overlapping intervals."""
    from dstudio.distill.evaluation.fingerprint import same_noise
    from dstudio.distill.evaluation.interval import significant

    fa, fb = a.get("fingerprint"), b.get("fingerprint")
    if not (fa and fb and fa.get("id") == fb.get("id")) or not (a["figure"]["fid_ci95"] and b["figure"]["fid_ci95"]):
        return False
    boots = a["figure"].get("fid_boot"), b["figure"].get("fid_boot")
    paired = same_noise(fa, fb) and all(boots) and len(boots[0]) == len(boots[1])
    return not significant(a["figure"], b["figure"], paired=paired)


def mark_not_significant(rows: list[dict]) -> list[dict]:
    """The rows with `not_significant_vs`: the other rows (of these) whose FID each does not differ from, named
    `row` within its source and `source/row` across sources; '-' when it has an interval and differs from all."""
    out = []
    for r in rows:
        same = [o["row"] if o["source"] == r["source"] else f"{o['source']}/{o['row']}"
                for o in rows if o is not r and not_significant(r, o)]
        cell = ", ".join(same[:MAX_NAMED]) + (f" +{len(same) - MAX_NAMED} more" if len(same) > MAX_NAMED else "")
        out.append({**r, "not_significant_vs": cell or ("-" if r["figure"].get("fid_ci95") else None)})
    return out


def fid_rows(runs: str | Path | None) -> list[dict]:
    """Every FID row of the result JSONs under benchmarks/results and of the eval.json / fid/*.json under --runs,
    with precision / recall from the file's report card and the protocol fingerprint of its FID."""
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
        rows += [_board_row(r, f, run_method, _row_fingerprint(r, section)) for r in section["rows"]
                 if r.get("fid") is not None]
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
    ci = f" {r['fid_ci95']}" if r.get("fid_ci95") else ""
    pr = f" · precision {r['precision']:.2f}, recall {r['recall']:.2f}" if r.get("precision") is not None else ""
    return f"{r['row']} ({r['source']}, {r['method']})<br>{r['nfe']} NFE · FID {r['fid']:.4g}{ci}{pr} · {speed}"


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
