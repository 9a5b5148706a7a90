"""Bad input across the CLI: each a one-line `dstudio: error: ...` naming the value, exit code 2, and nothing on
disk changed (every byte of the case's folder, run folders included, is compared before and after)."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from dstudio.app.cli import main

MARKER = "code-ran"  # a file the crafted checkpoint's unpickling would create


class _RunsCode:
    """Unpickling this calls open(path, "w"): a stand-in for any code a crafted pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _damaged_teachers(tmp, tiny):
    """Copies of the tiny teacher without its weights, with truncated weights, without its scheduler folder."""
    weights = "unet/diffusion_pytorch_model.safetensors"
    for name in ("no_weights", "truncated", "no_scheduler"):
        shutil.copytree(tiny, tmp / name)
    (tmp / "no_weights" / weights).unlink()
    size = (tmp / "truncated" / weights).stat().st_size
    os.truncate(tmp / "truncated" / weights, size // 2)
    shutil.rmtree(tmp / "no_scheduler" / "scheduler")


def _runs(tmp, tiny):
    """A finished ddpm run (the tiny teacher's own run folder), one with a crafted and one with an old-format
    checkpoint, and a folder that holds a search."""
    shutil.copytree(tiny.parent, tmp / "run")
    (tmp / "evil_run").mkdir()
    torch.save({"format": 2, "step": _RunsCode(str(tmp / MARKER))}, tmp / "evil_run" / "checkpoint.pt")
    (tmp / "old_run").mkdir()
    import numpy as np

    torch.save({"step": 3, "rng": {"numpy": np.random.get_state()}}, tmp / "old_run" / "checkpoint.pt")
    (tmp / "search_run").mkdir()
    (tmp / "search_run" / "search_state.json").write_text('{"generation": 1}')
    (tmp / "one_image").mkdir()


def _setup(tmp, tiny):
    """Fixtures on disk the table refers to by name: {tiny} {empty} {file} {corrupt_index} {bad_sched} ..."""
    from PIL import Image
    import numpy as np

    (tmp / "empty").mkdir()
    (tmp / "file").write_text("not a folder")
    (tmp / "corrupt_index").mkdir()
    (tmp / "corrupt_index" / "model_index.json").write_text("{oops")
    (tmp / "bad_sched").mkdir()
    (tmp / "bad_sched" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "SearchedScheduler", "timesteps": [100, 900]}))
    (tmp / "junk_sched").mkdir()
    (tmp / "junk_sched" / "scheduler_config.json").write_text("[[[")
    (tmp / "alien_sched").mkdir()
    (tmp / "alien_sched" / "scheduler_config.json").write_text(json.dumps({"_class_name": "WarpDrive"}))
    (tmp / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "mixed" / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp / "mixed" / "b.png")
    (tmp / "broken_run").mkdir()
    (tmp / "broken_run" / "checkpoint.pt").write_bytes(b"half a zip")
    (tmp / "bad.json").write_text("{")
    (tmp / "nobest.json").write_text('{"steps": [999, 500], "solver": "ddim"}')
    (tmp / "badbest.json").write_text('{"best": {"steps": ["late", "early"], "solver": "ddim"}}')
    (tmp / "corrupt_png").mkdir()
    (tmp / "corrupt_png" / "a.png").write_bytes(b"not a png")
    (tmp / "bad_captions").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "bad_captions" / "a.png")
    (tmp / "bad_captions" / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "gone"}\n')
    _damaged_teachers(tmp, tiny)
    _runs(tmp, tiny)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "one_image" / "a.png")
    names = ("empty", "file", "corrupt_index", "bad_sched", "junk_sched", "alien_sched", "mixed", "broken_run",
             "corrupt_png", "bad_captions", "no_weights", "truncated", "no_scheduler", "run", "evil_run", "old_run",
             "search_run", "one_image")
    return {"tiny": str(tiny), "bad_json": str(tmp / "bad.json"), "nobest": str(tmp / "nobest.json"),
            "badbest": str(tmp / "badbest.json"), **{n: str(tmp / n) for n in names}}


OUT = "{tmp}/out"
CASES = [
    # paths and pipelines
    ("sample --teacher /no/such/dir", "teacher '/no/such/dir' does not exist"),
    ("sample --teacher {empty}", "is not a diffusers pipeline folder (no model_index.json)"),
    ("sample --teacher {corrupt_index}", "has a corrupt model_index.json"),
    ("sample --teacher {file}", "is not a diffusers pipeline folder"),
    ("sample --teacher {tiny} --out {file}", "is not a writable folder"),
    # schedulers
    ("sample --teacher {tiny} --scheduler warp", "unknown scheduler 'warp': use one of ddim"),
    ("sample --teacher {tiny} --scheduler-dir {empty}", "has no scheduler_config.json"),
    ("sample --teacher {tiny} --scheduler-dir {junk_sched}", "has a corrupt scheduler_config.json"),
    ("sample --teacher {tiny} --scheduler-dir {alien_sched}", "'WarpDrive'"),
    ("sample --teacher {tiny} --scheduler-dir {bad_sched}", "must be strictly decreasing"),
    ("sample --teacher {tiny} --scheduler ddim --scheduler-dir {bad_sched}", "not both"),
    # out-of-range values
    ("sample --teacher {tiny} --class 10", "class 10 is outside the teacher's labels 0..9"),
    ("sample --teacher {tiny} --class -1", "class -1 is outside the teacher's labels 0..9"),
    ("sample --teacher {tiny} --steps -3", "--steps must be >= 1, got -3"),
    ("sample --teacher {tiny} --steps three", "--steps must be an integer, got 'three'"),
    ("sample --teacher {tiny} --num-images 0", "--num-images must be >= 1, got 0"),
    # configs
    ("features train --epochs 0", "--epochs must be >= 1, got 0"),
    ("teacher train --set trainer.stepz=3", "unknown config key 'trainer.stepz' (did you mean 'trainer.steps'?)"),
    ("teacher train --set method.lr=-1", "method.lr=-1.0 must be > 0"),
    ("teacher train --set trainer.batch_size=abc", "trainer.batch_size='abc' must be an integer"),
    ("teacher train --set trainer.ema_decay=1.5", "trainer.ema_decay=1.5 must be in [0, 1)"),
    ("teacher train --set lr=1", "must start with trainer. or method."),
    ("teacher train --preset huge", "unknown preset 'huge'"),
    ("teacher train --preset {bad_json}.yaml", "does not exist"),
    ("teacher train --data cifar", "unknown data set 'cifar'"),
    ("teacher train --data {empty}", "holds no images"),
    ("teacher train --data {corrupt_png}", "a.png' cannot be read"),
    ("distill dmd2 --teacher {tiny} --data {bad_captions}", "names 1 missing image(s), e.g. 'b.png'"),
    ("distill dmd2 --teacher {tiny} --set method.lr_generator=fast", "method.lr_generator='fast' must be a number"),
    ("distill msd --teacher {tiny} --data digits --student-width 0.5 --steps 10",
     "method.tsm_steps=500 leaves no distillation in trainer.steps=10"),
    ("distill nope", "unknown method 'nope'"),
    ("distill dmd2 --teacher {tiny} --set method.critic_ratio=0", "method.critic_ratio=0 must be >= 1"),
    ("distill dmd2 --teacher {empty}", "no model_index.json"),
    ("distill sim --teacher {tiny} --set method.loss=kl", "method.loss='kl' is not one of 'sim', 'sid'"),
    ("distill dmd2 --teacher {tiny} --student-width 0.5", "--student-width does not apply to method 'dmd2'"),
    ("distill slimflow --teacher {tiny} --student-width 0", "method.student_width=0.0 must be in (0, 1]"),
    ("distill slimflow --teacher {tiny} --set method.guide_t=[0.8,0.2]", "must satisfy 0 < lo < hi < 1"),
    ("distill rf --teacher {tiny} --init random", "method.init='random' is not one of 'teacher', 'scratch'"),
    ("distill rf --teacher {tiny} --set method.solver=rk4", "method.solver='rk4' is not one of 'dpmpp', 'heun'"),
    ("distill rf --teacher {tiny} --pairs {file}", "pair store '"),
    ("distill ict --teacher {tiny} --target bogus", "method.target='bogus' is not one of 'self', 'teacher'"),
    ("distill ict --teacher {tiny} --set method.s0=0", "method.s0=0 and method.s1=1280 must satisfy"),
    # damaged teachers
    ("sample --teacher {no_weights}", "no file named diffusion_pytorch_model.safetensors"),
    ("sample --teacher {truncated}", "could not load pipeline"),
    ("sample --teacher {no_scheduler}", "lacks the component folder(s) scheduler"),
    ("distill dmd2 --teacher {truncated}", "could not load pipeline"),
    ("distill rf --teacher {no_weights}", "no file named diffusion_pytorch_model.safetensors"),
    ("search --teacher {no_scheduler}", "lacks the component folder(s) scheduler"),
    # wrong types, zero and negative sizes, NFE out of range
    ("teacher train --set trainer.steps=1.5", "trainer.steps=1.5 must be an integer"),
    ("teacher train --set trainer.cpu=maybe", "trainer.cpu='maybe' must be true or false"),
    ("teacher train --set method.channels=16", "method.channels=16 must be a list"),
    ("teacher train --set trainer.batch_size=0", "trainer.batch_size=0 must be > 0"),
    ("teacher train --set trainer.grad_accum=-2", "trainer.grad_accum=-2 must be > 0"),
    ("teacher train --set method.resolution=-8", "method.resolution=-8 must be >= 4"),
    ("teacher train --steps 0", "--steps must be >= 1, got 0"),
    ("distill msd --teacher {tiny} --students 0", "--students must be >= 1, got 0"),
    ("distill slimflow --teacher {tiny} --student-width -0.5", "method.student_width=-0.5 must be in (0, 1]"),
    ("distill dmd2 --teacher {tiny} --eval-per-class -1", "--eval-per-class must be >= 0, got -1"),
    ("sample --teacher {tiny} --batch-size 0", "--batch-size must be >= 1, got 0"),
    ("sample --teacher {tiny} --steps 0", "--steps must be >= 1, got 0"),
    ("search --teacher {tiny} --nfe -1", "--nfe -1 must be in 1..1000"),
    # dstudio plan
    ("plan /no/such/dir", "teacher '/no/such/dir' does not exist"),
    ("plan {empty}", "is not a diffusers pipeline folder (no model_index.json)"),
    ("plan {tiny} --method warp", "unknown method 'warp'"),
    ("plan {tiny} --gpu-memory lots", "--gpu-memory 'lots' must be a positive size such as 24GB"),
    ("plan {tiny} --lora-rank -1", "--lora-rank must be >= 0, got -1"),
    ("plan {tiny} --batch-size 0", "--batch-size must be >= 1, got 0"),
    ("plan {tiny} --resolution 0", "--resolution must be >= 1, got 0"),
    ("search --teacher {tiny} --population 0", "--population must be >= 1, got 0"),
    ("search --teacher {tiny} --top-k -3", "--top-k must be >= 1, got -3"),
    ("app --port 0", "--port must be >= 1, got 0"),
    # flags the method does not use
    ("distill rf --teacher {tiny} --data digits", "--data does not apply to method 'rectified_flow': it trains on "
                                                 "pairs (noise, sample) from its teacher's ODE"),
    ("distill slimflow --teacher {tiny} --data {empty}", "--data does not apply to method 'slimflow'"),
    ("distill sim --teacher {tiny} --data digits", "--data does not apply to method 'sim': it trains on its own "
                                                   "samples scored by the teacher (data-free)"),
    ("distill consistency --teacher {tiny} --prompts {file}", "--prompts does not apply to method 'consistency'"),
    # checkpoints, run folders, resume mismatches
    ("teacher train --resume --out {empty}", "no checkpoint.pt"),
    ("teacher train --resume --out {broken_run} --data digits --set method.resolution=8 "
     "--set method.channels=[8,16]", "is corrupt"),
    ("teacher train --resume --out {evil_run}", "holds objects other than tensors and plain data"),
    ("teacher train --resume --out {old_run}", "refused without unpickling it"),
    ("teacher train --out {run}", "{run} holds a run: --resume to continue, --overwrite to start over"),
    ("distill dmd2 --teacher {tiny} --out {run}", "holds a run: --resume to continue, --overwrite to start over"),
    ("teacher train --resume --overwrite --out {run}", "give --resume (continue the run) or --overwrite"),
    ("distill dmd2 --teacher {tiny} --resume --out {run}", "was made by method 'ddpm', not 'dmd2'"),
    ("distill rf --teacher {tiny} --resume --out {run}", "was made by method 'ddpm', not 'rectified_flow'"),
    ("teacher train --resume --out {run} --data digits --set method.channels=[16,32]",
     "method.channels ([8, 16] -> [16, 32])"),
    ("teacher train --resume --out {run} --data digits --set method.channels=[8,16] --set trainer.seed=3",
     "trainer.seed (0 -> 3)"),
    ("search --teacher {tiny} --out {search_run}", "holds a run: --resume to continue, --overwrite to start over"),
    ("search --teacher {tiny} --resume --out {empty}", "no search_state.json"),
    # FID, reports, search
    ("fid --images /no/images", "image folder '/no/images' does not exist"),
    ("fid --images {empty}", "holds no images"),
    ("fid --images {mixed}", "images of mixed sizes"),
    ("fid --images {mixed} --ref {tmp}/nope.npz", "mixed sizes"),
    ("fid --images {one_image}", "gives 1 image(s): FID needs at least 2 for a covariance"),
    ("fid --images {mixed} --ref {one_image}", "mixed sizes"),
    ("report {tmp}/missing.json", "neither a run folder nor a result .json"),
    ("report {bad_json}", "is not valid JSON"),
    ("search --teacher {tiny} --nfe 0", "--nfe 0 must be in 1..1000"),
    ("search --teacher {tiny} --nfe 5000", "--nfe 5000 must be in 1..1000"),
    ("search --teacher {tiny} --skip-blocks --skip-budget 1", "--skip-budget 1.0 must be in [0, 1)"),
    # every other option (test_every_option_has_a_bad_input_case)
    ("teacher train --deterministic=yes", "argument --deterministic: ignored explicit argument 'yes'"),
    ("distill dmd2 --teacher {tiny} --preset huge", "unknown preset 'huge'"),
    ("distill dmd2 --teacher {tiny} --steps 0", "--steps must be >= 1, got 0"),
    ("distill dmd2 --teacher {tiny} --resume --overwrite --out {run}", "give --resume (continue the run) or --overwrite"),
    ("distill dmd2 --teacher {tiny} --deterministic=1", "argument --deterministic: ignored explicit argument '1'"),
    ("distill dmd2 --teacher {tiny} --lora-rank -1", "--lora-rank must be >= 0, got -1"),
    ("sample --pipeline /no/such/dir", "teacher '/no/such/dir' does not exist"),
    ("sample --teacher {tiny} --prompt a_red_car", "--prompt 'a_red_car' is for text-to-image pipelines; "
                                                    "'{tiny}' takes class labels (--class)"),
    ("sample --teacher {tiny} --guidance strong", "--guidance must be a number, got 'strong'"),
    ("sample --teacher {tiny} --guidance nan", "--guidance must be a finite number, got 'nan'"),
    ("sample --teacher {tiny} --seed x1", "--seed must be an integer, got 'x1'"),
    ("sample --teacher {tiny} --class three", "--class must be an integer, got 'three'"),
    ("sample --teacher {tiny} --grid {file}/grid.png", "output '{file}' is not a writable folder"),
    ("fid --images {one_image} --features resnet", "argument --features: invalid choice: 'resnet'"),
    ("fid --images {one_image} --json {file}/r.json", "output '{file}' is not a writable folder"),
    ("fid --images {one_image} --save-ref-stats {file}/ref.npz", "output '{file}' is not a writable folder"),
    ("search --teacher {tiny} --solver rk4", "argument --solver: invalid choice: 'rk4'"),
    ("search --teacher {tiny} --skip-blocks --nfe 4 --max-steps 2", "--max-steps 2 must be in 4..1000"),
    ("search --teacher {tiny} --init {empty}/search.json", "--init '{empty}/search.json' cannot be read"),
    ("search --teacher {tiny} --init {bad_json}", "--init '{bad_json}' is not JSON"),
    ("search --teacher {tiny} --init {nobest}", "--init '{nobest}' has no \"best\" candidate"),
    ("search --teacher {tiny} --init {badbest}", "--init '{badbest}' has no \"best\" candidate"),
    ("search --teacher {tiny} --ref /no/such", "reference '/no/such' is neither 'mnist', a .npz statistics file nor"),
    ("search --teacher {tiny} --features resnet", "argument --features: invalid choice: 'resnet'"),
    ("search --teacher {tiny} --num-samples 0", "--num-samples must be >= 1, got 0"),
    ("search --teacher {tiny} --screen-samples 0", "--screen-samples must be >= 1, got 0"),
    ("search --teacher {tiny} --promote 0", "--promote must be >= 1, got 0"),
    ("search --teacher {tiny} --speed-images 0", "--speed-images must be >= 1, got 0"),
    ("search --teacher {tiny} --ref-steps 0", "--ref-steps must be >= 1, got 0"),
    ("search --teacher {tiny} --guidance strong", "--guidance must be a number, got 'strong'"),
    ("search --teacher {tiny} --prompts /no/such.txt", "prompts file '/no/such.txt' does not exist"),
    ("search --teacher {tiny} --prompts {file}", "--prompts is for text-to-image teachers; '{tiny}' takes class"),
    ("search --teacher {tiny} --generations 0", "--generations must be >= 1, got 0"),
    ("search --teacher {tiny} --seed one", "--seed must be an integer, got 'one'"),
    ("search --teacher {tiny} --nfe four", "--nfe must be an integer, got 'four'"),
    ("search --teacher {tiny} --skip-blocks --skip-budget most", "--skip-budget must be a number, got 'most'"),
    ("search --teacher {tiny} --resume --overwrite --out {search_run}", "give --resume (continue the run) or"),
    ("report {bad_json} --out {file}/report.html", "output '{file}' is not a writable folder"),
    ("app --runs {file}", "--runs '{file}' is not a folder"),
    ("app --teacher {empty}", "--teacher '{empty}' is not a diffusers pipeline folder (no model_index.json)"),
    ("app --host 0.0.0.0", "--host 0.0.0.0 opens the app"),
    ("app --auth bob", "--auth must look like user:password"),
]
# Options that take any value by design have no bad value to refuse; they are listed here, each with the reason.
# (None at present: --prompt is free text, but a prompt for a pipeline that takes none is refused.)
ANY_VALUE: dict[tuple[str, str], str] = {}


def _tree(root) -> dict[str, str]:
    """Every file and folder under `root` with its bytes' digest."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command, message", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input(command, message, tiny_teacher, tmp_path, capsys):
    names = _setup(tmp_path, tiny_teacher)
    argv = command.format(tmp=tmp_path, **names).split()
    if "--out" not in argv and argv[0] in ("sample", "teacher", "distill", "search"):
        argv += ["--out", OUT.format(tmp=tmp_path)]
    before = _tree(tmp_path)
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("dstudio: error:") and message.format(**names) in err[0], err
    assert "Traceback" not in err[0]
    assert _tree(tmp_path) == before  # nothing written, no run folder touched
    assert not (tmp_path / MARKER).exists()


def test_crafted_checkpoint_would_run_code_and_is_refused(tiny_teacher, tmp_path, capsys):
    """The crafted checkpoint does run code when unpickled (so the refusal test can fail); dstudio never does."""
    import pickle
    import zipfile

    _runs(tmp_path, tiny_teacher)
    with zipfile.ZipFile(tmp_path / "evil_run" / "checkpoint.pt") as z:
        payload = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert not (tmp_path / MARKER).exists()
    pickle.loads(payload)  # what torch.load(weights_only=False) did
    assert (tmp_path / MARKER).exists()
    (tmp_path / MARKER).unlink()
    code = main(["distill", "rectified_flow", "--resume", "--out", str(tmp_path / "evil_run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refused without unpickling it" in err[0], err
    assert not (tmp_path / MARKER).exists()


def _leaf_commands(parser, prefix=()):
    """Every runnable `dstudio ...` command with options of its own, as word tuples."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaf_commands(sub, (*prefix, name))
            return
    if any(a.dest != "help" for a in parser._actions):
        yield prefix


def _cases_of(command: tuple) -> list[list[str]]:
    """The argv of every case of `command` (its words first)."""
    return [cmd.split() for cmd, _ in CASES if tuple(cmd.split()[:len(command)]) == command]


def test_every_command_that_takes_options_has_a_bad_input_case():
    from dstudio.app.parser import build_parser

    missing = [" ".join(c) for c in _leaf_commands(build_parser()) if not _cases_of(c)]
    assert not missing, f"commands without a bad-input case: {missing}"


def test_every_option_has_a_bad_input_case():
    """Each option of each command (method flags included, as the registry declares them) appears in a case of
    that command, or in ANY_VALUE with its reason."""
    from dstudio.app.parser import build_parser

    def leaves(parser, prefix=()):
        import argparse

        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield prefix, parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from leaves(sub, (*prefix, name))

    missing = []
    for command, parser in leaves(build_parser()):
        words = {w.split("=")[0] for argv in _cases_of(command) for w in argv}
        for action in parser._actions:
            flags = [f for f in action.option_strings if f not in ("-h", "--help")]
            if flags and not words & set(flags) and (" ".join(command), flags[-1]) not in ANY_VALUE:
                missing.append(f"{' '.join(command)} {flags[-1]}")
    assert not missing, f"options without a bad-input case: {missing}"
