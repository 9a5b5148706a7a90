"""The teacher zoo: teachers of every parameterisation dstudio did not make, and what dmd2 / rectified_flow do on each.

    python benchmarks/teachers.py [--only NAME ...] [--students dmd2 rectified_flow] [--reuse]
                                  [--teacher-steps S] [--teacher-batch 32] [--per-class 100]

Each zoo teacher is trained on MNIST-5k at 16x16 by the documented command

    dstudio teacher train --preset full --steps S --set trainer.batch_size=B --set method.layout=diffusers OPTIONS

into benchmarks/runs/zoo/NAME (a DDPMPipeline folder: model_index.json + unet/ + scheduler/), then each student is
`dstudio distill METHOD --preset quick --teacher benchmarks/runs/zoo/NAME/pipeline`. Rows: the teacher at 50 steps
(trailing DDIM for DDPM teachers, its own Euler for flow matching) and each student at 1 NFE on the protocol's
noise, FID-mnist and the ratio to that teacher. --reuse evaluates finished runs instead of training them again.
Writes benchmarks/results/teachers.json and its table in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from dstudio.app.benchmark import RESULTS, merge_rows, write_results
from dstudio.distill.core.images import collapse_reason, save_grid
from dstudio.distill.core.teacher import load_pipeline, reference_scheduler
from dstudio.distill.evaluation.fid import fid_of_tensor
from dstudio.distill.evaluation.protocol import Unconditional, pipeline_images, protocol_for

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "zoo"
ZOO = {  # name: `dstudio teacher train` options (besides --preset full and the layout)
    "eps-cosine": ["--set", "method.prediction_type=epsilon", "--set", "method.clip_sample=true"],
    "flow": ["--set", "method.objective=flow_matching"],
    "v-zero-snr": ["--set", "method.prediction_type=v_prediction", "--set", "method.rescale_betas_zero_snr=true"],
    "sample-linear": ["--set", "method.prediction_type=sample", "--set", "method.beta_schedule=linear"],
    "eps-uncond": ["--set", "method.prediction_type=epsilon", "--set", "method.beta_schedule=linear",
                   "--set", "method.conditional=false"],
}
# Training steps (--teacher-steps overrides). Epsilon teachers get more: at 500 steps their DDIM-50 samples had grey or
# saturated backgrounds (FID-mnist 16.4 and 26.6), an epsilon model's x0 = (x - sigma eps) / alpha magnifying its error
# at high noise, which the v, x0 and flow teachers do not.
STEPS = {"eps-cosine": 2500, "eps-uncond": 2500}
DEFAULT_STEPS = 500
STUDENTS = ("dmd2", "rectified_flow")


def run_cli(args: list[str], log: Path) -> float:
    """Run `dstudio ARGS` with its output in `log`; the wall time in seconds."""
    cmd = [sys.executable, "-m", "dstudio.app.cli", *args]
    print(" ".join(cmd[2:]), file=sys.stderr)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def finished(run: Path) -> bool:
    return (run / "pipeline" / "model_index.json").is_file()


def trained_steps(run: Path) -> int:
    return yaml.safe_load((run / "config.yaml").read_text())["trainer"]["steps"]


def train_teacher(name: str, steps: int | None, batch: int, reuse: bool) -> tuple[Path, float | None]:
    run, steps = RUNS / name, steps or STEPS.get(name, DEFAULT_STEPS)
    if reuse and finished(run):
        return run, None
    args = ["teacher", "train", "--preset", "full", "--steps", str(steps), "--set", f"trainer.batch_size={batch}",
            "--set", "method.layout=diffusers", *ZOO[name], "--out", str(run)]
    args.append("--resume" if (run / "checkpoint.pt").is_file() else "--overwrite")  # a folder without one holds nothing to keep
    return run, run_cli(args, RUNS / f"{name}.log")


def train_student(teacher_run: Path, method: str, reuse: bool) -> tuple[Path, float | None]:
    run = teacher_run.parent / f"{teacher_run.name}-{method}"
    if reuse and finished(run):
        return run, None
    args = ["distill", method, "--preset", "quick", "--teacher", str(teacher_run / "pipeline"), "--out", str(run),
            "--eval-per-class", "0", "--overwrite"]  # not reused: trained again
    return run, run_cli(args, teacher_run.parent / f"{run.name}.log")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(ZOO), default=list(ZOO))
    p.add_argument("--students", nargs="*", choices=STUDENTS, default=list(STUDENTS))
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs instead of training them again")
    p.add_argument("--teacher-steps", type=int, default=None, help=f"default: {DEFAULT_STEPS}, or as STEPS says")
    p.add_argument("--teacher-batch", type=int, default=32)
    p.add_argument("--per-class", type=int, default=100)
    args = p.parse_args(argv)

    rows, grids = [], RESULTS / "teachers"
    proto = None

    def measure(name, pipe, nfe, **extra):
        with torch.no_grad():
            images, seconds = pipeline_images(pipe, labels, noise, nfe)
        row = {"name": name, "nfe": nfe, "fid": fid_of_tensor(images, ref, space, name)["fid"],
               "images_per_s": len(images) / seconds, "collapse": collapse_reason(images), **extra}
        save_grid(images[::args.per_class // 10][:100], grids / f"{name}.png", nrow=10, upscale=2)
        rows.append(row)
        print(f"{name:>32}  {nfe:>2} NFE  FID {row['fid']:.4f}", file=sys.stderr)
        return row

    for name in args.only:
        teacher_run, teacher_seconds = train_teacher(name, args.teacher_steps, args.teacher_batch, args.reuse)
        teacher = load_pipeline(teacher_run / "pipeline")
        if proto is None:
            proto = protocol_for(teacher, args.per_class)
            labels, noise, space, ref = (proto[k] for k in ("labels", "noise", "space", "ref"))
        if not teacher.unet.config.num_class_embeds:
            teacher = Unconditional(teacher)
        teacher.scheduler = reference_scheduler(teacher.scheduler)
        if isinstance(teacher, Unconditional):
            teacher.pipe.scheduler = teacher.scheduler
        t_row = measure(f"{name}-teacher-50", teacher, 50, teacher=name, method="teacher",
                        train_minutes=teacher_seconds and teacher_seconds / 60,
                        teacher_steps=trained_steps(teacher_run))
        for method in args.students:
            run, seconds = train_student(teacher_run, method, args.reuse)
            student = load_pipeline(run / "pipeline")
            if not student.unet.config.num_class_embeds:
                student = Unconditional(student)
            row = measure(f"{name}-{method}-1", student, 1, teacher=name, method=method,
                          train_minutes=seconds and seconds / 60)
            row["fid_vs_teacher"] = row["fid"] / t_row["fid"]
    previous = RESULTS / "teachers.json"
    if set(args.only) != set(ZOO) and previous.is_file():  # a partial rerun updates its teachers' rows
        old = json.loads(previous.read_text())
        rows = merge_rows(rows, old["rows"], old["date"], key=lambda r: r["teacher"])
    write_results("teachers", {
        "command": "python benchmarks/teachers.py" + ("" if argv is None else " " + " ".join(argv)),
        "protocol": {"per_class": args.per_class, "noise_seed": 0, "features": "mnist",
                     "reference": ref.source if proto else None},
        "teacher_training": {"steps": {n: args.teacher_steps or STEPS.get(n, DEFAULT_STEPS) for n in ZOO},
                             "batch_size": args.teacher_batch, "options": ZOO},
        "floor": proto and proto["floor"], "rows": rows,
        "columns": [["name", "row"], ["nfe", "NFE"], ["fid", "FID-mnist"], ["fid_vs_teacher", "x its teacher-50"],
                    ["collapse", "collapse check"], ["teacher_steps", "teacher steps"],
                    ["train_minutes", "training minutes"],
                    ["measured", "earlier run"]],
        "notes": ["zoo teachers: 16x16 MNIST-5k, the shipped teacher's UNet, trained for "
                  "'teacher steps' at --teacher-batch (far shorter than the shipped teacher's 6,000 x 128: the shared CPU's budget), "
                  "so their own FIDs are well above the shipped teacher's",
                  "students: the quick presets of dmd2 and rectified_flow, unchanged, on each teacher",
                  "training minutes: wall time on this machine while other jobs shared its cores"],
    })
    print(f"wrote {RESULTS / 'teachers.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
