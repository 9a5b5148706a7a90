"""Every trainer on the shipped teacher: FID-mnist at 1 (and 2 / 4) NFE, training wall time, parameters and
images/s against the teacher at 50 DDIM steps, all measured in one run of this script.

    python benchmarks/distill.py [--preset quick|full] [--only NAME ...] [--sweeps] [--reuse]

RUNS holds one row per method and its main options, SWEEPS (--sweeps, or by name with --only) the settings searched
to pick the defaults. Each row trains `dstudio distill METHOD --preset P` into benchmarks/runs/P/NAME (kept out of
git) unless --reuse finds a finished run there (an interrupted one, --reuse continues from its checkpoint), then samples the
exported pipeline on the protocol's noise.
Writes benchmarks/results/distill-P.json (grids in benchmarks/results/distill-P/) and its table in
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from dstudio.app.benchmark import RESULTS, merge_rows, source_commit, trained_at, write_results
from dstudio.distill.core.images import save_grid
from dstudio.distill.core.io import atomic_path
from dstudio.distill.core.teacher import DEFAULT_TEACHER, load_pipeline, reference_scheduler
from dstudio.distill.evaluation.fid import fid_of_tensor
from dstudio.distill.evaluation.interval import fid_fields
from dstudio.distill.evaluation.protocol import pipeline_images, protocol_for

ROOT = Path(__file__).resolve().parent
NARROW = "method.lora_targets=[to_q,to_k,to_v,to_out.0,conv1,conv2,time_emb_proj]"


def lrs(generator: str, critic: str | None = None) -> list[str]:
    """The generator's and the critic's learning rates (one for both unless `critic` is given)."""
    return ["--set", f"method.lr_generator={generator}", "--set", f"method.lr_critic={critic or generator}"]


# name: (method, extra CLI arguments, NFEs to measure); `{preset}` is --preset. RUNS: one row per method and
# its main options (the README table); SWEEPS (--sweeps): the settings searched to pick the defaults
RUNS = {
    "dmd2": ("dmd2", ["--preset", "{preset}"], [1]),
    "dmd2-4step": ("dmd2", ["--preset", "{preset}", "--set", "method.num_steps=4"], [4]),
    "dmd2-lora64": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64"], [1]),
    "sim": ("sim", ["--preset", "{preset}"], [1]),
    "msd-k1": ("msd", ["--preset", "{preset}", "--students", "1"], [1]),
    "msd-k2": ("msd", ["--preset", "{preset}", "--students", "2"], [1]),
    "msd-k4": ("msd", ["--preset", "{preset}", "--students", "4"], [1]),
    "msd-k4-small": ("msd", ["--preset", "{preset}-small"], [1]),
    "rectified_flow": ("rectified_flow", ["--preset", "{preset}"], [1, 2]),
    "slimflow": ("slimflow", ["--preset", "{preset}"], [1, 2]),
    "consistency": ("consistency", ["--preset", "{preset}"], [1, 2]),
    "consistency-init-teacher": ("consistency", ["--preset", "{preset}", "--init", "teacher"], [1, 2]),
}
SWEEPS = {
    # LoRA student and fake score over the teacher's own weights (alpha = rank); adapters on DMD2's own LoRA targets
    # (the default), or on the narrower set dstudio first used (attention and resnet convolutions)
    "dmd2-lora16": ("dmd2", ["--preset", "{preset}", "--lora-rank", "16"], [1]),
    "dmd2-lora64-lr2e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", *lrs("2e-3")], [1]),
    "dmd2-lora64-lr1.5e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", *lrs("1.5e-3")], [1]),
    "dmd2-lora64-lr2e-3-critic1e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", *lrs("2e-3", "1e-3")],
                                      [1]),
    "dmd2-lora64-lr2e-3-critic3e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", *lrs("2e-3", "3e-3")],
                                      [1]),
    "dmd2-lora16-lr2e-3-critic3e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "16", *lrs("2e-3", "3e-3")],
                                      [1]),
    # LoRA+ (Hayou et al. 2024): the B factors at 4x the A factors' learning rate
    "dmd2-lora64-plus4-lr1e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", *lrs("1e-3"), "--set",
                                          "method.lora_plus_ratio=4"], [1]),
    "dmd2-lora64-lr3e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", *lrs("3e-3")], [1]),
    "dmd2-lora16-narrow": ("dmd2", ["--preset", "{preset}", "--lora-rank", "16", "--set", NARROW], [1]),
    "dmd2-lora64-narrow": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", "--set", NARROW], [1]),
    "dmd2-lora64-narrow-lr2e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", "--set", NARROW,
                                           *lrs("2e-3")], [1]),
    "dmd2-lora64-narrow-a128-lr2e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", "--set", NARROW,
                                                "--set", "method.lora_alpha=128", *lrs("2e-3")], [1]),
    # DMD2's own LoRA recipe: the student an adapter, the fake score a full trainable copy (more memory)
    "dmd2-lora64-fullfake-lr2e-3": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", "--set",
                                             "method.lora_fake_score=false", *lrs("2e-3")], [1]),
    "dmd2-lora64-fullfake-lr2e-3-critic5e-4": ("dmd2", ["--preset", "{preset}", "--lora-rank", "64", "--set",
                                                        "method.lora_fake_score=false", *lrs("2e-3", "5e-4")], [1]),
    # MSD's options: one fake score and GAN head shared by the students; the smaller students' three stages (TSM,
    # DM, DM + GAN)
    "msd-k4-shared-critic": ("msd", ["--preset", "{preset}", "--students", "4", "--set", "method.critics=shared"],
                             [1]),
    "msd-k4-small-3stage": ("msd", ["--preset", "{preset}-small", "--set", "method.dm_steps=200"], [1]),
    # the flow methods without their perceptual distance (method.perceptual: LPIPS, else the teacher's features)
    "rectified_flow-no-perceptual": ("rectified_flow", ["--preset", "{preset}", "--set", "method.perceptual=none"],
                                     [1, 2]),
    # a longer one-step distillation phase at the same total steps (quick: 400 reflow + 200 distillation steps)
    "rectified_flow-reflow200": ("rectified_flow", ["--preset", "{preset}", "--set", "method.reflow_steps=200"],
                                 [1, 2]),
    # SIM's pseudo-Huber surrogate (the default loss is SiD's)
    "sim-huber": ("sim", ["--preset", "{preset}", "--set", "method.loss=sim"], [1]),
    "slimflow-no-perceptual": ("slimflow", ["--preset", "{preset}", "--set", "method.perceptual=none"], [1, 2]),
    # one student for as long as four take (a step of K students trains each on a whole batch: K times the work)
    "msd-k1-1600": ("msd", ["--preset", "{preset}", "--students", "1", "--set", "trainer.steps=1600"], [1]),
    # a batch of 256 (the default is 64)
    "msd-k4-b256": ("msd", ["--preset", "{preset}", "--students", "4", "--set", "trainer.batch_size=256"], [1]),
}


def check_runs(runs: dict) -> dict:
    """Every row names a registered method (a renamed or removed method fails here, not after hours of training);
    the default row (its preset, at 1 and 2 NFE) of each registered distiller without one: a new method file is in
    the grid without an edit here."""
    from dstudio.distill.core.method import discover, get_method

    for name, (method, _, _) in runs.items():
        try:
            get_method(method)
        except ValueError as e:
            raise SystemExit(f"benchmarks/distill.py: row '{name}': {e}") from None
    named = {m for m, _, _ in runs.values()}
    rowless = sorted(n for n, c in discover().items() if c.is_distiller and n not in named)
    return {n: (n, ["--preset", "{preset}"], [1, 2]) for n in rowless}


def params(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def train(name: str, row: tuple, preset: str, reuse: bool) -> tuple[Path, float | None]:
    """Train row `name` (with `reuse`: evaluate its finished run, or continue its interrupted one); its training seconds."""
    method, extra, _ = row
    run = ROOT / "runs" / preset / name
    record = run / "bench.json"
    earlier = json.loads(record.read_text())["train_seconds"] if record.is_file() else 0.0
    if reuse and (run / "pipeline" / "model_index.json").is_file():
        return run, earlier or None
    resume = reuse and (run / "checkpoint.pt").is_file()
    if not resume:
        record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dstudio.app.cli", "distill", method, *[a.format(preset=preset) for a in extra],
           "--out", str(run), "--eval-per-class", "0",
           "--resume" if resume else "--overwrite"]  # a row measured again is trained again
    print(" ".join(cmd), file=sys.stderr)
    t0 = time.time()
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{name}.log", "a" if resume else "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = (earlier if resume else 0.0) + time.time() - t0
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"train_seconds": seconds, "command": " ".join(cmd[2:])}))
    return run, seconds


def main(argv=None) -> int:
    runs = {**RUNS, **check_runs({**RUNS, **SWEEPS})}
    grid = {**runs, **SWEEPS}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--only", nargs="+", choices=list(grid), default=None, help="default: every RUNS row")
    p.add_argument("--sweeps", action="store_true", help="with the RUNS rows, the SWEEPS rows (the searched settings)")
    p.add_argument("--reuse", action="store_true",
                   help="evaluate finished runs instead of training them again, and continue interrupted ones")
    p.add_argument("--per-class", type=int, default=200)
    args = p.parse_args(argv)
    commit = source_commit()  # the code that trains the rows, whatever the checkout holds when they are written
    args.only = args.only or [*runs, *(SWEEPS if args.sweeps else ())]

    trained = {name: train(name, grid[name], args.preset, args.reuse) for name in args.only}

    teacher = load_pipeline(DEFAULT_TEACHER)
    proto = protocol_for(teacher, args.per_class)
    labels, noise, space, ref, floor = (proto[k] for k in ("labels", "noise", "space", "ref", "floor"))
    teacher.scheduler = reference_scheduler(teacher.scheduler)  # 50 DDIM steps: the reference of every ratio
    grids = RESULTS / f"distill-{args.preset}"  # one folder per preset: rows share names across presets
    rows = []

    def measure(name, pipe, nfe, **extra):
        with torch.no_grad():
            images, seconds = pipeline_images(pipe, labels, noise, nfe)
        row = {"name": f"{name}-{nfe}", "method": extra.pop("method", name), "nfe": nfe,
               **fid_fields(fid_of_tensor(images, ref, space, name)), "images_per_s": len(images) / seconds, **extra}
        save_grid(images[::args.per_class // 10][:100], grids / f"{row['name']}.png", nrow=10, upscale=2)
        row["grid"] = str((grids / f"{row['name']}.png").relative_to(RESULTS.parent.parent))
        rows.append(row)
        print(f"{row['name']:>32}  FID {row['fid']:.4f}  {row['images_per_s']:.0f} img/s", file=sys.stderr)
        return row

    t_row = measure("teacher-ddim", teacher, 50, method="teacher", params=params(teacher.unet))
    for name, (run, seconds) in trained.items():
        pipe = load_pipeline(run / "pipeline")
        info = {"method": grid[name][0], "params": params(pipe.unet), "train_minutes": seconds and seconds / 60,
                "trained": trained_at(run)}
        if hasattr(pipe.unet, "students"):
            info["params_per_student"] = max(params(s) for s in pipe.unet.students)
        for nfe in grid[name][2]:
            measure(name, pipe, nfe, **info)
    for r in rows:
        r["fid_vs_teacher"] = r["fid"] / t_row["fid"]
        r["speedup"] = r["images_per_s"] / t_row["images_per_s"]
        r["params_vs_teacher"] = r["params"] / t_row["params"]
    previous = RESULTS / f"distill-{args.preset}.json"
    if previous.is_file():  # rows not measured again (other --only, the sweeps) stay, with their date and commit
        old = json.loads(previous.read_text())
        rows = merge_rows(rows, old["rows"], old["date"], key=lambda r: r["name"].rsplit("-", 1)[0],
                          commit=old.get("commit"))
        for r in rows:  # the teacher's FID is deterministic on the protocol's noise: FID ratios stay comparable
            r["fid_vs_teacher"] = r["fid"] / t_row["fid"]
    write_results(f"distill-{args.preset}", {"commit": commit,
        "command": " ".join(["python benchmarks/distill.py", *(sys.argv[1:] if argv is None else argv)]),
        "teacher": str(DEFAULT_TEACHER), "preset": args.preset,
        "protocol": {"per_class": args.per_class, "noise_seed": 0, "features": "mnist", "reference": ref.source},
        "fingerprint": proto["fingerprint"], "floor": floor, "rows": rows,
        "columns": [["name", "row"], ["nfe", "NFE"], ["fid", "FID-mnist"], ["fid_vs_teacher", "x teacher-50"],
                    ["images_per_s", "images/s"], ["speedup", "speed vs teacher-50"], ["params", "parameters"],
                    ["params_vs_teacher", "x teacher params"], ["train_minutes", "training minutes"],
                    ["trained", "trained (export date)"], ["measured", "earlier run"], ["commit", "commit"]],
        "notes": ["rows with a `measured` date come from an earlier run of this script (`--only` reruns the others)",
                  "training minutes: wall time of `dstudio distill` (pair generation included) on this machine, "
                  "while other jobs may have shared its cores; speeds are measured in this one run",
                  "teacher-ddim-50: the shipped teacher with 50 trailing DDIM steps, the reference of every ratio"],
    })
    print(f"wrote {RESULTS / f'distill-{args.preset}.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
