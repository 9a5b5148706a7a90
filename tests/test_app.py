"""`dstudio app`: every API endpoint through gradio_client, and Compare in a real headless browser."""
import shutil
import socket
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="the app needs the .[app] extra (pip install -e '.[dev]' includes it)")


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
    port = _free_port()
    demo = launch(port, runs, block=False)
    yield f"http://127.0.0.1:{port}/", runs
    demo.close()


@pytest.fixture(scope="module")
def client(studio):
    from gradio_client import Client

    return Client(studio[0], verbose=False)


def test_discover_lists_unloadable_pipelines_with_their_reason(studio):
    from dstudio.app.studio import discover

    entries = {e.name: e for e in discover(studio[1])}
    assert entries["teacher"].available and entries["tiny"].available
    assert not entries["broken"].available and "corrupt model_index.json" in entries["broken"].error


def test_generate_same_noise_through_each_pipeline(client):
    out = client.predict(["teacher", "tiny"], 3, "", 0, 1, 1.0, 2, api_name="/generate")
    assert len(out) == 4
    captions = [item["caption"] for item in out]
    assert captions[0].startswith("teacher · ") and "1 NFE" in captions[0] and "ms/image" in captions[0]
    assert captions[2].startswith("tiny · ")
    for item in out:
        assert Path(item["image"]).is_file() and Path(item["image"]).stat().st_size > 0
    from gradio_client import handle_file

    gallery = [{"image": handle_file(item["image"]), "caption": item["caption"]} for item in out]
    left, right = client.predict(gallery, "teacher", "tiny", api_name="/slider")
    assert Path(left).is_file() and Path(right).is_file()


@pytest.mark.parametrize("args, message", [
    ((["teacher"], 12, "", 0, 1, 1.0, 1), "class 12 is outside this pipeline's classes 0..9"),
    ((["teacher"], 1, "", 0, 5000, 1.0, 1), "Value 5000 is greater than maximum value 100"),
    (([], 1, "", 0, 1, 1.0, 1), "choose at least one pipeline"),
])
def test_bad_input_is_refused_in_the_page(client, args, message):
    with pytest.raises(Exception, match=message):
        client.predict(*args, api_name="/generate")


def test_fid_board_and_compute_fid(client):
    table, plot = client.predict(api_name="/fid_board")
    assert table["headers"] == ["source", "row", "nfe", "fid", "images_per_s"]
    assert any(row[0] == "samplers" for row in table["data"])  # benchmarks/results/samplers.json
    text = client.predict("tiny", 2, api_name="/compute_fid")
    assert text.startswith("tiny: FID-mnist ") and "on 20 images" in text


def test_jobs_write_run_folders_and_report_their_error(client, studio, tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text("trainer: {steps: 2, batch_size: 4, sample_every: 1, checkpoint_every: 2}\n"
                      "method: {num_pairs: 8, shard_size: 8, solver_steps: 2, reflow_steps: 1, lpips: false}\n")
    status, grid = client.predict("distill", "rectified_flow", str(preset), 4, api_name="/start_job")
    assert status.startswith("done: ") and Path(grid).is_file()
    run = Path(status.split("\n")[0][len("done: "):])
    assert (run / "pipeline" / "model_index.json").is_file() and (run / "checkpoint.pt").is_file()
    with pytest.raises(Exception, match="dstudio: error: unknown preset 'nope'"):
        client.predict("distill", "dmd2", "nope", 4, api_name="/start_job")


def test_compare_in_a_headless_browser(studio, tmp_path):
    """Debian's chromium driven by Playwright: click Generate, wait for the images, check they are real images."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by .[dev]")
    if chromium is None:
        pytest.skip("no chromium binary: apt-get install chromium (see README, 'Tests')")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(studio[0])
        page.get_by_role("button", name="Generate").click()
        images = page.locator("#gallery img")
        images.nth(5).wait_for(timeout=120_000)  # default: 3 pipelines x 4 images = 12
        page.wait_for_function("() => [...document.querySelectorAll('#gallery img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
        sizes = page.eval_on_selector_all("#gallery img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        browser.close()
    assert len(sizes) == 8  # the teacher and tiny (the broken folder is unavailable), 4 images each
    assert all(w >= 32 and h >= 32 for w, h in sizes)
