"""kill -9 in the middle of a write: a checkpoint, a pair-store shard, a search generation. The next --resume
continues from the last complete state and no file on disk is ever half-written (a subprocess and a signal)."""
import json
import subprocess
import sys
import textwrap

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
                      "reflow_steps": 3, "lpips": False, "pairs": {pairs!r}}}), teacher=load_teacher({teacher!r}))
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
