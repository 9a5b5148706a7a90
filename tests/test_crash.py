"""kill -9 in the middle of a write: a checkpoint, a pair-store shard, a search generation. The next --resume
continues from the last complete state and no file on disk is ever half-written (a subprocess and a signal)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

# Runs in the child: SIGKILL the process inside the n-th os.replace onto a file whose name contains `target`,
# i.e. after the temp file is written and before it is renamed into place: the worst moment of a write.
KILLER = textwrap.dedent("""
    import os, signal
    _replace, _seen = os.replace, [0]
    def replace(src, dst, *a, **k):
        if {target!r} in str(dst):
            _seen[0] += 1
            if _seen[0] == {nth}:
                os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *a, **k)
    os.replace = replace
""")


def run_killed(body: str, target: str, nth: int, cwd) -> None:
    code = KILLER.format(target=target, nth=nth) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]


TRAIN = """
    import sys, torch
    from dstudio.distill.core.config import from_dict
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.methods.rectified_flow import RectifiedFlow, RectifiedFlowConfig
    torch.manual_seed(0)
    m = RectifiedFlow(from_dict(RectifiedFlowConfig, {{"num_pairs": 24, "shard_size": 8, "solver_steps": 2,
                      "reflow_steps": 3, "perceptual": "none", "pairs": {pairs!r}}}), teacher=load_teacher({teacher!r}))
    cfg = TrainerConfig(steps=6, batch_size=4, sample_every=100, checkpoint_every=2, grid_per_class=1)
    Trainer(m, cfg, {run!r}).fit(resume={resume})
"""


def _no_half_files(folder):
    return [p.name for p in folder.rglob(".*tmp*")]


def test_kill_during_checkpoint_write_then_resume(tiny_teacher, tmp_path):
    pairs = str(tmp_path / "pairs")
    run_killed(TRAIN.format(pairs=pairs, teacher=str(tiny_teacher), run=str(tmp_path / "a"), resume=False),
               "checkpoint.pt", nth=2, cwd=tmp_path)  # dies while writing the step-4 checkpoint
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2  # the last complete checkpoint, intact
    assert _no_half_files(tmp_path / "a")  # the killed write's temp file is there, never under the real name
    subprocess.run([sys.executable, "-c", textwrap.dedent(TRAIN.format(
        pairs=pairs, teacher=str(tiny_teacher), run=str(tmp_path / "a"), resume=True))], check=True, cwd=tmp_path,
        capture_output=True)
    subprocess.run([sys.executable, "-c", textwrap.dedent(TRAIN.format(
        pairs=pairs, teacher=str(tiny_teacher), run=str(tmp_path / "b"), resume=False))], check=True, cwd=tmp_path,
        capture_output=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, v in b["modules"]["student"].items():
        torch.testing.assert_close(a["modules"]["student"][k], v)
    assert not _no_half_files(tmp_path / "a")


PAIRS = """
    from dstudio.distill.core.pairs import PairStore
    from dstudio.distill.core.teacher import load_teacher
    teacher = load_teacher({teacher!r})
    spec = {{"teacher": "t", "solver": "dpmpp", "solver_steps": 2, "guidance": 1.0, "num_pairs": 20,
             "shard_size": 5, "seed": 0, "shape": list(teacher.sample_shape)}}
    PairStore({root!r}, spec).open().generate(teacher, lambda idx: idx % teacher.num_classes, progress=False)
"""


def test_kill_during_pair_shard_write_then_resume(tiny_teacher, tmp_path):
    from dstudio.distill.core.pairs import PairStore

    root = tmp_path / "pairs"
    run_killed(PAIRS.format(teacher=str(tiny_teacher), root=str(root)), "shard-", nth=3, cwd=tmp_path)
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-00000.pt", "shard-00001.pt"]
    for p in root.glob("shard-*"):
        torch.load(p, weights_only=True)  # every shard under its real name is whole
    subprocess.run([sys.executable, "-c", textwrap.dedent(PAIRS.format(teacher=str(tiny_teacher), root=str(root)))],
                   check=True, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, "-c", textwrap.dedent(PAIRS.format(teacher=str(tiny_teacher),
                                                                       root=str(tmp_path / "clean")))],
                   check=True, cwd=tmp_path, capture_output=True)
    spec = json.loads((root / "manifest.json").read_text())
    resumed, clean = PairStore(root, spec).load(), PairStore(tmp_path / "clean", spec).load()
    for k in ("z", "x1", "cond"):
        torch.testing.assert_close(resumed[k], clean[k])
    assert not _no_half_files(root)


SEARCH = """
    import json
    from dstudio.search import EvolutionConfig, SearchSpace, evolve
    def fitness(c):
        return sum((a - b) ** 2 for a, b in zip(c.steps, (70, 30, 5)))
    cfg = EvolutionConfig(population=10, generations=4, top_k=3, mutations=4, crossovers=2, seed=3)
    r = evolve(fitness, SearchSpace(100, 3), cfg, checkpoint={state!r}, resume={resume})
    json.dump({{"best": r.best_fitness, "evaluations": r.evaluations}}, open({out!r}, "w"))
"""


def test_kill_during_search_generation_then_resume(tmp_path):
    state, out = str(tmp_path / "state.json"), str(tmp_path / "out.json")
    run_killed(SEARCH.format(state=state, resume=False, out=out), "state.json", nth=3, cwd=tmp_path)
    saved = json.loads((tmp_path / "state.json").read_text())  # whole JSON: the generation before the kill
    assert saved["generation"] == 2
    subprocess.run([sys.executable, "-c", textwrap.dedent(SEARCH.format(state=state, resume=True, out=out))],
                   check=True, cwd=tmp_path, capture_output=True)
    clean = str(tmp_path / "clean.json")
    subprocess.run([sys.executable, "-c", textwrap.dedent(SEARCH.format(state=str(tmp_path / "s2.json"),
                                                                        resume=False, out=clean))],
                   check=True, cwd=tmp_path, capture_output=True)
    assert json.loads(open(out).read())["best"] == json.loads(open(clean).read())["best"]
    assert not _no_half_files(tmp_path)


# --- preemption: SIGTERM / SIGINT stop after the current step with a checkpoint --------------------------------
def _teacher_train(run, steps, *extra):
    return [sys.executable, "-m", "dstudio.app.cli", "teacher", "train", "--data", "digits",
            "--set", "method.resolution=8", "--set", "method.channels=[8,16]", "--set", "method.grid_steps=2",
            "--set", "trainer.batch_size=8", "--set", "trainer.grid_per_class=1",
            "--set", "trainer.log_every=1", "--set", "trainer.sample_every=100000",
            "--set", "trainer.checkpoint_every=100000", "--steps", str(steps), "--out", str(run), *extra]


def _logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_sigterm_stops_after_the_step_and_resume_loses_nothing(tmp_path, capsys):
    signum, code = signal.SIGTERM, 143
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_teacher_train(run, 100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while not ((run / "log.jsonl").is_file() and len(_logged_steps(run)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    found = re.findall(r"dstudio: stopped at step (\d+); rerun with --resume", err)
    assert len(found) == 1, err[-2000:]
    n = int(found[0])
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == n  # periodic checkpoints were off
    assert _logged_steps(run) == list(range(1, n + 1))
    from dstudio.app.cli import main

    assert main(_teacher_train(run, n + 2, "--resume")[3:]) == 0  # in-process: one interpreter start less
    assert f"trainer.steps={n + 2} (was 100000)" in capsys.readouterr().err  # the allowed override is logged
    assert _logged_steps(run) == list(range(1, n + 3))  # the resumed run's first step is n + 1: nothing lost


def test_search_stops_after_the_generation_and_resumes(tmp_path):
    from dstudio.distill.core.signals import Stopped, stop_signals
    from dstudio.search import EvolutionConfig, SearchSpace, evolve

    calls = []

    def fitness(c):
        calls.append(c)
        if len(calls) == 12:  # inside generation 2 (generation 1 evaluates 1 + population // 2 = 6)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return sum((a - b) ** 2 for a, b in zip(c.steps, (70, 30, 5)))

    cfg = EvolutionConfig(population=10, generations=4, top_k=3, mutations=4, crossovers=2, seed=3)
    state = tmp_path / "state.json"
    with stop_signals(), pytest.raises(Stopped, match="stopped after generation 2; rerun with --resume") as stop:
        evolve(fitness, SearchSpace(100, 3), cfg, checkpoint=state)
    assert stop.value.code == 130 and json.loads(state.read_text())["generation"] == 2
    resumed = evolve(fitness, SearchSpace(100, 3), cfg, checkpoint=state, resume=True)
    straight = evolve(lambda c: sum((a - b) ** 2 for a, b in zip(c.steps, (70, 30, 5))), SearchSpace(100, 3), cfg)
    assert resumed.best_fitness == straight.best_fitness and resumed.history == [
        {**h, "seconds": r["seconds"]} for h, r in zip(straight.history, resumed.history)]


# --- a full disk at each write site: the previous good file is kept, no temp is left ------------------------------
def _full_disk(real):
    """A write function that writes part of its output and then finds the disk full."""
    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial") if not Path(path).is_dir() else (Path(path) / "part").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_full_disk_while_writing_a_checkpoint(tmp_path, monkeypatch):
    from dstudio.distill.core.io import DiskFullError
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8
    from dstudio.distill.methods.ddpm import DDPM, DDPMConfig

    data = digits8(8)
    trainer = Trainer(DDPM(DDPMConfig(data="digits", resolution=8, channels=(8, 16)), data=data),
                      TrainerConfig(steps=1, batch_size=4, sample_every=100), tmp_path, data=data)
    trainer.fit(export=False)
    before = _files(tmp_path)
    monkeypatch.setattr(torch, "save", _full_disk(torch.save))
    with pytest.raises(DiskFullError, match=f"no space left on the device of '{tmp_path}'.*checkpoint.pt "
                                            r"\(the previous one is kept\)"):
        trainer.save_checkpoint()
    assert _files(tmp_path) == before


def test_full_disk_while_writing_a_pair_shard(tiny_teacher, tmp_path, monkeypatch):
    from dstudio.distill.core.io import DiskFullError
    from dstudio.distill.core.pairs import PairStore
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(tiny_teacher)
    spec = {"teacher": "t", "solver": "dpmpp", "solver_steps": 2, "guidance": 1.0, "num_pairs": 10,
            "shard_size": 5, "seed": 0, "shape": list(teacher.sample_shape)}
    store = PairStore(tmp_path / "pairs", spec).open()
    before = _files(tmp_path)
    monkeypatch.setattr(torch, "save", _full_disk(torch.save))
    with pytest.raises(DiskFullError, match="pairs'.*shard-00000.pt \\(nothing was written\\)"):
        store.generate(teacher, lambda idx: idx % teacher.num_classes, progress=False)
    assert _files(tmp_path) == before


def test_full_disk_while_exporting(tiny_teacher, tmp_path, monkeypatch):
    from dstudio.distill.core.export import export_image_pipeline
    from dstudio.distill.core.io import DiskFullError
    from dstudio.distill.core.pipeline_dstudio import DStudioPipeline
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(tiny_teacher)
    export_image_pipeline(teacher.unet, teacher.scheduler, tmp_path / "pipeline")
    before = _files(tmp_path)
    monkeypatch.setattr(DStudioPipeline, "save_pretrained", lambda self, path, **kw: _full_disk(None)(None, path))
    with pytest.raises(DiskFullError, match="pipeline \\(the previous one is kept\\)"):
        export_image_pipeline(teacher.unet, teacher.scheduler, tmp_path / "pipeline")
    assert _files(tmp_path) == before


def test_full_disk_while_saving_the_search_state(tmp_path, monkeypatch):
    import pathlib

    from dstudio.distill.core.io import DiskFullError
    from dstudio.search import EvolutionConfig, SearchSpace, evolve

    state = tmp_path / "state.json"
    fitness = lambda c: float(sum(c.steps))  # noqa: E731
    evolve(fitness, SearchSpace(100, 3), EvolutionConfig(population=6, generations=1, top_k=2, mutations=2,
                                                         crossovers=1), checkpoint=state)
    before = _files(tmp_path)
    monkeypatch.setattr(pathlib.Path, "write_text", lambda self, text, *a, **k: _full_disk(None)(text, self))
    with pytest.raises(DiskFullError, match="state.json \\(the previous one is kept\\)"):
        evolve(fitness, SearchSpace(100, 3), EvolutionConfig(population=6, generations=2, top_k=2, mutations=2,
                                                             crossovers=1), checkpoint=state, resume=True)
    assert _files(tmp_path) == before


def test_full_disk_is_one_line_from_the_cli(tiny_teacher, tmp_path, monkeypatch, capsys):
    from dstudio.app.cli import main

    monkeypatch.setattr(torch, "save", _full_disk(torch.save))
    code = main(["distill", "rf", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "run"),
                 "--set", "method.num_pairs=4", "--set", "method.solver_steps=1", "--steps", "1"])
    out = capsys.readouterr().err
    err = [line for line in out.replace("\r", "\n").splitlines() if line.startswith("dstudio:")]  # and a progress bar
    assert code == 2 and "Traceback" not in out and len(err) == 1, out
    assert err[0].startswith("dstudio: error: no space left on the device of '"), err
    assert f"{tmp_path / 'run' / 'pairs'}'" in err[0]


# --- run folders: the lock, --overwrite, one log -----------------------------------------------------------------
def test_run_folder_lock_and_overwrite(tmp_path):
    from dstudio.distill.core.checkpoint import RunExistsError
    from dstudio.distill.core.io import RunLockedError, run_folder_lock, run_folder_locked
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8
    from dstudio.distill.methods.ddpm import DDPM, DDPMConfig

    data = digits8(8)

    def trainer(steps, lr=1e-3):
        method = DDPM(DDPMConfig(data="digits", resolution=8, channels=(8, 16), lr=lr), data=data)
        return Trainer(method, TrainerConfig(steps=steps, batch_size=4, log_every=1, sample_every=100), tmp_path,
                       data=data)

    trainer(2).fit(export=False)
    with pytest.raises(RunExistsError, match="holds a run: --resume to continue, --overwrite to start over"):
        trainer(2).fit(export=False)
    with run_folder_lock(tmp_path):
        assert run_folder_locked(tmp_path)
        with pytest.raises(RunLockedError, match="being written by another dstudio process"):
            trainer(3).fit(resume=True, export=False)
    assert not run_folder_locked(tmp_path)
    resumed = trainer(3, lr=5e-4)
    resumed.fit(resume=True, export=False)  # a new learning rate is allowed, and used
    assert all(g["lr"] == 5e-4 for o in resumed.optimizers.values() for g in o.param_groups)
    assert _logged_steps(tmp_path) == [1, 2, 3]
    trainer(2).fit(overwrite=True, export=False)
    assert _logged_steps(tmp_path) == [1, 2]  # one run, one log
