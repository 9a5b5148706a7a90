"""`dstudio app`: every API endpoint through gradio_client, the page's bounds and path confinement, and Compare
and the jobs form in a real headless browser."""
import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="the app needs the .[app] extra (pip install -e '.[dev]' includes it)")

TINY_PRESET = ("trainer: {steps: 2, batch_size: 4, sample_every: 1, checkpoint_every: 2, log_every: 1}\n"
               "method: {num_pairs: 8, shard_size: 8, solver_steps: 2, reflow_steps: 1, perceptual: none}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tiny_teacher, tmp_path_factory):
    from dstudio.app.studio import launch

    runs = tmp_path_factory.mktemp("runs")
    shutil.copytree(tiny_teacher, runs / "tiny")
    (runs / "broken").mkdir()
    (runs / "broken" / "model_index.json").write_text("{")
    (runs / "tiny.yaml").write_text(TINY_PRESET)
    (runs / "elsewhere").symlink_to(tiny_teacher)  # a link out of the runs folder
    port = _free_port()
    demo = launch(port, runs, block=False)
    yield f"http://127.0.0.1:{port}/", runs
    demo.close()


@pytest.fixture(scope="module")
def client(studio):
    from gradio_client import Client

    return Client(studio[0], verbose=False)


def _rows(out):
    """(label, [image paths]) of each visible Compare row from /generate's outputs."""
    slots = out[:-1] if len(out) % 2 else out
    rows = []
    for label, gallery in zip(slots[0::2], slots[1::2]):
        if label.get("visible"):
            rows.append((label["value"], [item["image"] for item in gallery["value"]]))
    return rows


def test_find_pipelines_lists_unloadable_ones_with_their_reason(studio):
    from dstudio.app.studio.compare import find_pipelines

    entries = {e.name: e for e in find_pipelines(studio[1])}
    assert entries["teacher"].available and entries["tiny"].available
    assert not entries["broken"].available and "corrupt model_index.json" in entries["broken"].error


def test_compare_rows_are_labelled_with_nfe_seconds_and_speedup(client):
    from PIL import Image

    out = client.predict(["teacher", "tiny"], 3, "", 0, 1, 1.0, 2, api_name="/generate")
    rows = _rows(out)
    assert [label.split(" · ")[:3] for label, _ in rows] == [["teacher", "teacher", "1 NFE"], ["tiny", "ddpm", "1 NFE"]]
    seconds = [float(re.search(r"· ([0-9.e-]+) s/image ·", label).group(1)) for label, _ in rows]
    speedups = [float(re.search(r"([0-9.]+)x the speed of teacher$", label).group(1)) for label, _ in rows]
    assert speedups[0] == 1.0
    assert speedups[1] == pytest.approx(seconds[0] / seconds[1], rel=0.01)
    for _, images in rows:
        assert len(images) == 2
        for path in images:  # 16 px and 8 px images, upscaled to 128 px
            with Image.open(path) as img:
                assert img.format == "PNG" and img.width >= 128 and img.width % 8 == 0
    left, right = client.predict("teacher", "tiny", api_name="/slider")
    assert Path(left).is_file() and Path(right).is_file()
    with Image.open(left) as a, Image.open(rows[0][1][0]) as b:
        assert a.tobytes() == b.tobytes()  # the slider shows the first image of each row


def test_upscaling_is_nearest_neighbour_by_a_whole_factor():
    from PIL import Image

    from dstudio.app.studio.compare import readable

    img = Image.new("L", (8, 8))
    img.putpixel((3, 5), 255)
    big = readable(img)
    assert big.size == (128, 128)
    assert {big.getpixel((x, y)) for x in range(48, 64) for y in range(80, 96)} == {255}
    assert big.getpixel((47, 80)) == 0 and big.getpixel((48, 96)) == 0
    assert readable(Image.new("L", (256, 256))).size == (256, 256)


@pytest.mark.parametrize("args, message", [
    ((["teacher"], 12, "", 0, 1, 1.0, 1), "class 12 is outside this pipeline's classes 0..9"),
    ((["teacher"], 1, "", 0, 5000, 1.0, 1), "Value 5000 is greater than maximum value 100"),
    ((["teacher"], 1, "", 0, 1, 1.0, 17), "Value 17 is greater than maximum value 16"),
    (([], 1, "", 0, 1, 1.0, 1), "choose at least one pipeline"),
    ((["teacher"] * 7, 1, "", 0, 1, 1.0, 1), "7 pipelines chosen: compare at most 6 at once"),
    ((["nowhere"], 1, "", 0, 1, 1.0, 1), "unknown pipeline 'nowhere'"),
    ((["broken"], 1, "", 0, 1, 1.0, 1), "pipeline 'broken' is unavailable"),
])
def test_bad_input_is_refused_in_the_page(client, args, message):
    with pytest.raises(Exception, match=re.escape(message)):
        client.predict(*args, api_name="/generate")


def test_pareto_front_and_filters():
    from dstudio.app.studio.board import filter_rows, pareto_front

    rows = [{"source": "a", "method": "m", "row": "slow-good", "fid": 1.0, "images_per_s": 10.0},
            {"source": "a", "method": "m", "row": "dominated", "fid": 3.0, "images_per_s": 50.0},
            {"source": "b", "method": "n", "row": "mid", "fid": 2.0, "images_per_s": 100.0},
            {"source": "b", "method": "n", "row": "fast-bad", "fid": 5.0, "images_per_s": 1000.0},
            {"source": "b", "method": "n", "row": "unmeasured", "fid": 0.5, "images_per_s": None}]
    assert [r["row"] for r in pareto_front(rows)] == ["fast-bad", "mid", "slow-good"]
    assert [r["row"] for r in filter_rows(rows, ["b"], [])] == ["mid", "fast-bad", "unmeasured"]
    assert [r["row"] for r in filter_rows(rows, [], ["m"])] == ["slow-good", "dominated"]
    assert filter_rows(rows, ["a"], ["n"]) == []


def test_fid_board_filters_labels_and_pareto_front_and_compute_fid(client):
    table, by_nfe, by_speed, sources, methods = client.predict([], [], api_name="/fid_board")
    assert table["headers"] == ["source", "method", "row", "nfe", "fid", "fid_ci95", "precision", "recall",
                                "images_per_s", "not_significant_vs"]
    assert {"samplers", "distill-quick"} <= {row[0] for row in table["data"]}
    assert {"ddim", "dmd2"} <= {row[1] for row in table["data"]}
    speed = json.loads(by_speed["plot"])
    front = next(t for t in speed["data"] if t["name"] == "Pareto front")
    assert front["text"] and all(any(row[2] == name for row in table["data"]) for name in front["text"])
    assert all("NFE · FID" in text for t in speed["data"] for text in t.get("text") or t.get("hovertext") or []
               if t["name"] != "Pareto front")
    table, *_ = client.predict(["samplers"], ["ddim"], api_name="/fid_board")
    assert table["data"] and all(row[0] == "samplers" and row[1] == "ddim" for row in table["data"])
    text = client.predict("tiny", 2, api_name="/compute_fid")
    assert text.startswith("tiny: FID-mnist ") and ", FID-pixels " in text and "on 20 images" in text
    assert "; precision " in text and "recall" in text
    with pytest.raises(Exception, match="images per class 501 is outside 1..500"):
        client.predict("tiny", 501, api_name="/compute_fid")


def test_loss_curves_read_json_only():
    from dstudio.app.studio.jobs import loss_curves

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "log.jsonl"
        log.write_text('{"step": 1, "time": 0.1, "gen/loss": 0.5, "fake/loss": 2}\n'
                       '__import__("os").system("false")\n'
                       '{"step": 2, "time": 0.2, "gen/loss": NaN, "fake/loss": 1.5}\n'
                       '{"step": 3, "gen/lo')  # a line the trainer is still writing
        assert loss_curves(log) == [{"step": 1, "loss": "gen/loss", "value": 0.5},
                                    {"step": 1, "loss": "fake/loss", "value": 2.0},
                                    {"step": 2, "loss": "fake/loss", "value": 1.5}]
        assert loss_curves(Path(d) / "missing.jsonl") == []


def test_job_from_the_form_runs_and_its_pipeline_joins_compare(client, studio):
    runs = studio[1]
    out = client.predict("rectified_flow", "tiny", "tiny.yaml", 2, "trainer.batch_size=4", api_name="/start_job")
    status, loss, grid, queue, number, chosen = out[:6]
    assert status.startswith(f"job {number} done: dstudio distill rectified_flow --teacher {runs / 'tiny'}")
    assert "--steps 2 --set trainer.batch_size=4 --out" in status and "step 2: " in status
    run = Path(queue["data"][0][3])
    assert run.parent == runs / "app" and (run / "pipeline" / "model_index.json").is_file()
    points = [dict(zip(loss["columns"], p)) for p in loss["data"]]
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sorted({p["step"] for p in points}) == [1, 2]
    assert {p["loss"] for p in points} == {k for record in logged for k in record} - {"step", "time"}
    assert Path(grid).is_file()
    name = f"app/{run.name}/pipeline"
    assert name in [c[0] for c in chosen["choices"]]  # in Compare without a restart
    rows = _rows(client.predict(["tiny", name], 3, "", 0, 0, 1.0, 1, api_name="/generate"))
    assert rows[1][0].startswith(f"{name} · rectified_flow · ")


@pytest.mark.parametrize("form, message", [
    (("dmd2", "/etc", "quick", 0, ""), "teacher folder '/etc' is outside the folders this page may use"),
    (("dmd2", "../..", "quick", 0, ""), "teacher folder '../..' is outside the folders this page may use"),
    (("dmd2", ".", "quick", 0, ""), "teacher folder '.' is not a diffusers pipeline folder"),
    (("dmd2", "", "/tmp/x.yaml", 0, ""), "preset file '/tmp/x.yaml' is outside the folders this page may use"),
    (("dmd2", "", "quick", 0, "method.data=../../etc"), "path in --set method.data=../../etc '../../etc' is outside"),
    (("dmd2", "", "quick", 0, "method.prompts=[ok, /etc/passwd]"), "'/etc/passwd' is outside"),
    (("dmd2", "", "quick", 0, "method.data=elsewhere"), "path in --set method.data=elsewhere 'elsewhere' is outside"),
    (("dmd2", "elsewhere", "quick", 0, ""), "teacher folder 'elsewhere' is outside"),
    (("dmd2", "", "nope", 0, ""), "dstudio: error: unknown preset 'nope' for dmd2 on mnist: use one of quick"),
    (("dmd2", "", "quick", 0, "student.lr=1"), "dstudio: error: override 'student.lr=1' must start with trainer."),
    (("dmd2", "", "quick", 0, "nokey"), "dstudio: error: override 'nokey' must look like section.key=value"),
    (("dmd2", "", "quick", 0, "method.nokey=1"), "dstudio: error: unknown config key 'method.nokey'; known keys: "),
    (("sim", "", "quick", 0, "trainer.batch_size=abc"), "dstudio: error: trainer.batch_size='abc' must be an integer"),
    (("dmd2", "", "quick", 200_000, ""), "Value 200000 is greater than maximum value 100000"),
    (("search", "", "quick", 4, "trainer.steps=3"), "a search takes no --set overrides"),
])
def test_job_form_refuses_paths_outside_and_bad_arguments(client, studio, form, message):
    with pytest.raises(Exception, match=re.escape(message)):
        client.predict(*form, api_name="/start_job")
    assert not (studio[1] / "app").is_dir() or all(p.suffix == ".log" or (p / "pipeline").is_dir()
                                                    for p in (studio[1] / "app").iterdir())


def test_job_queue_runs_one_at_a_time_and_bounds_the_job_count(tmp_path):
    import sys

    from dstudio.app.studio.jobs import JobQueue

    # a stand-in for the CLI: sleeps argv[1] seconds, prints argv[2] as its last line, exits with argv[3]
    program = (sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1])); print(sys.argv[2]); "
                                     "sys.exit(int(sys.argv[3]))")
    queue = JobQueue(concurrency=1, max_jobs=2, program=program)
    submit = lambda *argv: queue.submit(lambda run: list(argv), lambda n: tmp_path / f"run{n}", tmp_path)  # noqa
    first, second = submit("1", "first", "0"), submit("0", "second", "0")
    assert first.state == "running" and second.state == "queued"
    with pytest.raises(Exception, match=r"2 jobs are already queued or running \(at most 2\)"):
        submit("0", "third", "0")
    deadline = time.monotonic() + 60
    while second.state == "queued" and time.monotonic() < deadline:
        assert first.state == "running" or first.state == "done"
        time.sleep(0.05)
    assert first.state == "done" and first.log_path.read_text() == "first\n"
    while second.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.state == "done" and second.progress() == "second"
    failing, waiting = submit("0", "dstudio: error: bad teacher", "2"), submit("30", "never", "0")
    queue.cancel(waiting)
    while failing.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failing.error() == "dstudio: error: bad teacher" and waiting.state == "cancelled"
    time.sleep(1.0)
    assert waiting.proc is None  # a cancelled job never starts


def test_app_binds_localhost_and_another_host_needs_auth(capsys, tmp_path):
    from dstudio.app.cli import main

    assert main(["app", "--host", "0.0.0.0", "--runs", str(tmp_path)]) == 2
    assert "give --auth user:password too" in capsys.readouterr().err
    assert main(["app", "--host", "0.0.0.0", "--auth", "nopassword", "--runs", str(tmp_path)]) == 2
    assert "--auth must look like user:password" in capsys.readouterr().err
    assert main(["app", "--teacher", str(tmp_path), "--runs", str(tmp_path)]) == 2
    assert "is not a diffusers pipeline folder" in capsys.readouterr().err


def test_auth_is_required_when_given(tmp_path):
    from gradio_client import Client

    from dstudio.app.studio import launch

    port = _free_port()
    demo = launch(port, tmp_path, block=False, auth=("ann", "s3cret"))
    try:
        assert demo.server_name == "127.0.0.1"
        with pytest.raises(Exception):
            Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception):
            Client(f"http://127.0.0.1:{port}/", auth=("ann", "wrong"), verbose=False)
        names = Client(f"http://127.0.0.1:{port}/", auth=("ann", "s3cret"), verbose=False).predict(api_name="/rescan")
        assert [c[0] for c in names[0]["choices"]] == ["teacher"]
    finally:
        demo.close()


def test_compare_rows_and_jobs_form_in_a_headless_browser(studio, tmp_path):
    """Debian's chromium driven by Playwright: Compare rows labelled in the DOM (screenshot kept in tmp_path), no
    upload offered, and the jobs form refusing a folder outside and showing the CLI's own error."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by .[dev]")
    if chromium is None:
        pytest.skip("no chromium binary: apt-get install chromium (see README, 'Tests')")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(studio[0])
        page.get_by_role("button", name="Generate").click()
        page.locator("#row-1 img").nth(7).wait_for(timeout=120_000)  # default: teacher and tiny, 8 images each
        page.wait_for_function("() => [...document.querySelectorAll('.compare-row img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
        labels = [page.locator(f"#row-{i} [data-testid=markdown]").inner_text() for i in range(2)]
        sizes = page.eval_on_selector_all(".compare-row img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        uploads = page.locator(".compare-row input[type=file]").count()
        drop_text = page.get_by_text("Drop Media Here").count()
        shot = tmp_path / "compare.png"
        page.screenshot(path=str(shot), full_page=True)
        page.locator("#row-0").screenshot(path=str(tmp_path / "row-0.png"))

        page.get_by_role("tab", name="Jobs").click()
        page.locator("#job-teacher textarea").fill("/etc")
        page.get_by_role("button", name="Start").click()
        page.get_by_text("teacher folder '/etc' is outside the folders this page may use").first.wait_for(
            timeout=30_000)
        page.locator("#job-teacher textarea").fill("")
        page.locator("#job-overrides textarea").fill("nokey")
        page.get_by_role("button", name="Start").click()
        page.get_by_text("override 'nokey' must look like section.key=value").first.wait_for(timeout=30_000)
        browser.close()
    assert labels[0].startswith("teacher · teacher · ") and labels[0].endswith("1.00x the speed of teacher")
    assert labels[1].startswith("tiny · ddpm · ") and "NFE" in labels[1] and "s/image" in labels[1]
    assert len(sizes) == 16 and all(w >= 128 and h >= 128 for w, h in sizes)
    assert uploads == 0 and drop_text == 0
    assert shot.stat().st_size > 10_000 and (tmp_path / "row-0.png").is_file()
