"""The CLI: sampling from a pipeline, and one-line errors with exit code 2 for bad input."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from dstudio.app.cli import main

DSTUDIO = [sys.executable, "-m", "dstudio.app.cli"]


def test_sample_writes_pngs(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--pipeline", str(tiny_teacher), "--steps", "2", "--num-images", "3", "--class", "7",
                 "--scheduler", "dpmpp", "--guidance", "2", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (8, 8)
    meta = json.loads((out / "samples.json").read_text())
    assert meta["scheduler"] == "DPMSolverMultistepScheduler" and meta["class_label"] == 7


@pytest.mark.parametrize("args, message", [
    (["--teacher", "/no/such/dir"], "teacher '/no/such/dir' does not exist"),
    (["--teacher", "{empty}"], "is not a diffusers pipeline folder (no model_index.json)"),
    (["--scheduler", "warp"], "unknown scheduler 'warp': use one of ddim"),
    (["--class", "10"], "class 10 is outside the teacher's labels 0..9"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--out", "{file}"], "is not a writable folder"),
])
def test_sample_bad_input(args, message, tiny_teacher, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.format(empty=empty, file=blocker) for a in args]
    if "--teacher" not in args:
        args = ["--teacher", str(tiny_teacher)] + args
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    r = subprocess.run(DSTUDIO + ["sample", *args, *out, "--steps" if "--steps" not in args else "--seed", "1"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_teacher_train_bad_config(tmp_path, capsys):
    assert main(["teacher", "train", "--set", "trainer.stepz=3", "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'trainer.stepz' (did you mean 'trainer.steps'?)" in capsys.readouterr().err
    assert main(["teacher", "train", "--set", "method.lr=-1", "--out", str(tmp_path / "r")]) == 2
    assert "method.lr=-1.0 must be > 0" in capsys.readouterr().err
    assert main(["teacher", "train", "--preset", "huge", "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_teacher_train_cli_runs_and_resumes(tmp_path):
    run = tmp_path / "run"
    base = ["teacher", "train", "--data", "digits", "--out", str(run), "--set", "method.resolution=8",
            "--set", "method.channels=[8,16]", "--set", "method.grid_steps=2", "--set", "trainer.batch_size=8",
            "--set", "trainer.checkpoint_every=1"]
    assert main(base + ["--steps", "2"]) == 0
    assert main(base + ["--steps", "3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 3]  # the log closes each run's last step; the resumed run began at step 2
    assert (run / "pipeline" / "model_index.json").is_file()
