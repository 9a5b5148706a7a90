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
