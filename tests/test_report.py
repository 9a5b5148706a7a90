import json

import pytest

from dstudio.app.cli import main


def test_report_on_a_tiny_run(tiny_teacher, tmp_path, capsys):
    run = tiny_teacher.parent
    fid_json = tmp_path / "fid.json"
    fid_json.write_text(json.dumps({"fid": 3.5, "kid": 0.01, "features": "mnist", "n_generated": 20,
                                    "n_reference": 5000, "reference": "mnist5k@8px", "nfe": 2, "images_per_s": 50.0}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmark": "toy", "floor": 0.02, "rows": [
        {"name": "ddim-1", "sampler": "ddim", "nfe": 1, "fid": 9.0, "images_per_s": 400.0},
        {"name": "ddim-4", "sampler": "ddim", "nfe": 4, "fid": 2.0, "images_per_s": 100.0}]}))
    out = tmp_path / "r" / "report.html"
    assert main(["report", str(run), str(fid_json), str(bench), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<img") >= 2  # the plot and the run's sample grid, inlined
    assert "<td>ddim-1</td><td>1</td><td>9</td>" in page and "<td>ddim-4</td><td>4</td><td>2</td>" in page
    assert "real-vs-real floor: 0.02" in page
    assert "x slowest row" in page and ">8<" in page  # 400 / 50 images/s
    assert "label_dropout" in page and "src=\"http" not in page


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.json", "neither a run folder nor a result .json"),
    (lambda p: (p / "bad.json").write_text("{") and p / "bad.json", "is not valid JSON"),
    (lambda p: (p / "d").mkdir() or p / "d", "not a run folder"),
])
def test_report_bad_inputs(make, message, tmp_path, capsys):
    assert main(["report", str(make(tmp_path)), "--out", str(tmp_path / "x.html")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x.html").exists()


def test_benchmark_rows_merge_keeps_only_runs_not_measured_again():
    from dstudio.app.benchmark import merge_rows

    old = [{"name": "teacher-ddim-50", "method": "teacher", "fid": 1.0},
           {"name": "sim-1", "method": "sim", "fid": 2.0},
           {"name": "rf-1", "method": "rectified_flow", "fid": 3.0, "measured": "2026-01-01"},
           {"name": "rf-2", "method": "rectified_flow", "fid": 4.0, "measured": "2026-01-01"}]
    new = [{"name": "teacher-ddim-50", "method": "teacher", "fid": 1.5}, {"name": "sim-1", "method": "sim", "fid": 5.0}]
    merged = merge_rows(new, old, "2026-06-01", key=lambda r: r["name"].rsplit("-", 1)[0])
    assert [(r["name"], r["fid"], r.get("measured")) for r in merged] == [
        ("teacher-ddim-50", 1.5, None), ("sim-1", 5.0, None),
        ("rf-1", 3.0, "2026-01-01"), ("rf-2", 4.0, "2026-01-01")]


def test_benchmark_rows_carry_the_commit_that_measured_them(tmp_path):
    from dstudio.app.benchmark import source_commit, write_results

    rows = [{"name": "sim-1", "fid": 5.0}, {"name": "rf-1", "fid": 3.0, "measured": "2026-01-01", "commit": "abc1234"}]
    payload = write_results("x", {"rows": rows}, tmp_path / "x.json")
    commit = source_commit()
    assert commit is None or commit.split("+")[0].isalnum()
    assert payload["commit"] == commit
    assert [r["commit"] for r in payload["rows"]] == [commit, "abc1234"]


def test_trained_at_reads_the_export_date_of_a_run_or_a_pipeline(tmp_path):
    """A re-evaluated run (`--reuse`) keeps the date it was trained: its pipeline's dstudio.json `created`."""
    import json

    from dstudio.app.benchmark import trained_at

    (tmp_path / "run" / "pipeline").mkdir(parents=True)
    (tmp_path / "run" / "pipeline" / "dstudio.json").write_text(json.dumps({"created": "2026-12-05T04:18:52+00:00"}))
    assert trained_at(tmp_path / "run") == trained_at(tmp_path / "run" / "pipeline") == "2026-12-05T04:18:52+00:00"
    assert trained_at(tmp_path) is None  # a folder diffusers wrote (no dstudio.json)
