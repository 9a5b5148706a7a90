"""`dstudio report`: one self-contained HTML page from result JSONs and run folders."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from dstudio.app.benchmark import ROOT, rows_table
from dstudio.distill.core.errors import UserError
from dstudio.distill.evaluation.card import with_card

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}img{image-rendering:pixelated;margin:4px;border:1px solid #ddd}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}figure{display:inline-block;margin:6px}
figcaption{font-size:12px;text-align:center}"""


class ReportError(UserError):
    pass


def _img(path_or_bytes, width: int | None = None) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    w = f' width="{width}"' if width else ""
    return f'<img{w} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _html_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    md = rows_table(rows, columns).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in (md[0], *md[2:])]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _plot(rows: list[dict]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("fid") is not None and r.get("nfe")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for series in dict.fromkeys(r["series"] for r in pts):
        xy = sorted((r["nfe"], r["fid"]) for r in pts if r["series"] == series)
        ax.plot(*zip(*xy), marker="o", label=series)
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def card_html(card: dict | None) -> list[str]:
    """The report card: per space, a table of each row's precision, recall and per-class FID, and what it was
    measured on (Kynkäänniemi et al. 2019 for precision / recall)."""
    if not card or not card.get("rows"):
        return []
    out = [f"<h3>report card</h3><p>precision / recall: k = {card['k']} nearest neighbours, "
           f"{html.escape(card['real_subset'])}; per-class FID: {html.escape(card['per_class'])}</p>"]
    spaces = list(dict.fromkeys(s for entry in card["rows"].values() for s in entry))
    for space in spaces:
        rows = [{"name": name, **{k: v for k, v in entry[space].items() if k != "class_fid"},
                 **(entry[space].get("class_fid") or {})} for name, entry in card["rows"].items() if space in entry]
        classes = list(dict.fromkeys(c for r in card["rows"].values() for c in (r.get(space, {}).get("class_fid")
                                                                                 or {})))
        cols = [("name", "row"), ("precision", "precision"), ("recall", "recall"),
                *((c, f"FID class {c}") for c in classes)]
        out += [f"<p>{html.escape(space)} space</p>", _html_table(rows, cols)]
    return out


def fingerprint_html(fingerprints: dict | None) -> list[str]:
    """One line per feature space naming what produced its figures (the protocol fingerprint)."""
    from dstudio.distill.evaluation.fingerprint import describe

    return [f"<p>protocol fingerprint: {html.escape(describe(fp))}</p>" for fp in (fingerprints or {}).values()]


def load_section(item: str) -> dict:
    """A result JSON (benchmark or `dstudio fid --json`) or a run folder, as one report section."""
    path = Path(item)
    if path.is_dir():
        cfg = path / "config.yaml"
        if not cfg.is_file():
            raise ReportError(f"'{item}' is a folder but not a run folder (no config.yaml)")
        grids = sorted((path / "samples").glob("*.png")) if (path / "samples").is_dir() else []
        rows, evaluation = [], {}
        for f in sorted(path.glob("*.json")):
            r = json.loads(f.read_text())
            if "fid" in r:
                rows.append({"name": f.stem, **r})
            elif f.name == "eval.json" and "rows" in r:  # the end-of-run teacher-vs-student comparison
                evaluation = r
                rows += with_card(r["rows"], r.get("card"), r.get("features", "mnist"))
        return {"title": f"run {path.name}", "config": yaml.safe_load(cfg.read_text()), "rows": rows,
                "grids": [g for g in grids if g.name == "final.png"] or grids[-1:], "series": path.name,
                "card": evaluation.get("card"), "fingerprint": evaluation.get("fingerprint"),
                "features": evaluation.get("features")}
    if path.suffix == ".json" and path.is_file():
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"'{item}' is not valid JSON ({e.msg})") from None
        if "rows" in r:
            grids = [ROOT / row["grid"] for row in r["rows"] if row.get("grid") and (ROOT / row["grid"]).is_file()]
            return {"title": f"benchmark {r.get('benchmark', path.stem)}", "floor": r.get("floor"),
                    "rows": with_card(r["rows"], r.get("card"), r.get("features", "mnist")),
                    "config": {k: r[k] for k in ("command", "teacher", "protocol", "machine", "versions", "date")
                               if k in r}, "grids": grids, "series": None, "notes": r.get("notes", []),
                    "card": r.get("card"), "fingerprint": r.get("fingerprint"), "features": r.get("features")}
        if "fid" in r:
            return {"title": f"FID {path.stem}", "rows": [{"name": path.stem, **r}], "grids": [], "series": path.stem,
                    "config": {k: r[k] for k in ("reference", "features", "versions", "date") if k in r},
                    "fingerprint": r.get("fingerprint")}
        raise ReportError(f"'{item}' is JSON but neither a benchmark result nor an FID result")
    raise ReportError(f"'{item}' is neither a run folder nor a result .json file")


def build_report(items: list[str], out: str | Path) -> Path:
    from dstudio.distill.core.io import atomic_path

    if not items:
        raise ReportError("give at least one run folder or result JSON")
    sections = [load_section(i) for i in items]
    all_rows = []
    for s in sections:
        for r in s["rows"]:
            all_rows.append({**r, "series": s["series"] or r.get("sampler") or r.get("name")})
    speed_rows = [r for r in all_rows if r.get("images_per_s")]
    if speed_rows:
        slowest = min(r["images_per_s"] for r in speed_rows)
        for r in speed_rows:
            r["speed_ratio"] = r["images_per_s"] / slowest
    cols = [("name", "row"), ("nfe", "NFE"), ("fid", "FID [95% interval]"), ("features", "features"), ("kid", "KID"),
            ("precision", "precision"), ("recall", "recall"), ("images_per_s", "images/s"),
            ("speed_ratio", "x slowest row")]
    for r in all_rows:
        r.setdefault("features", "mnist")
    body = ["<h1>dstudio report</h1>", "<h2>FID and speed</h2>", _html_table(all_rows, cols)]
    plot = _plot(all_rows)
    if plot:
        body += ["<h2>FID vs NFE</h2>", _img(plot)]
    for s in sections:
        body.append(f"<h2>{html.escape(s['title'])}</h2>")
        if s.get("floor") is not None:
            body.append(f"<p>real-vs-real floor: {s['floor']:.4g}</p>")
        for note in s.get("notes", []):
            body.append(f"<p>{html.escape(note)}</p>")
        body += card_html(s.get("card")) + fingerprint_html(s.get("fingerprint"))
        if s["grids"]:
            body.append("".join(f"<figure>{_img(g, 320)}<figcaption>{html.escape(Path(g).stem)}</figcaption></figure>"
                                for g in s["grids"]))
        body.append(f"<details><summary>config</summary><pre>{html.escape(yaml.safe_dump(s['config'], sort_keys=False))}"
                    f"</pre></details>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>dstudio report</title><style>{CSS}</style>" \
           f"</head><body>{''.join(body)}</body></html>"
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
