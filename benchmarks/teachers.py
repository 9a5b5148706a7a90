"""The teacher zoo: teachers of every parameterisation, most of them shaped by other conventions than dstudio's, and
what each method's quick student does on each, in two feature spaces that share no network.

    python benchmarks/teachers.py [--only NAME ...] [--students dmd2 sim rectified_flow consistency]
                                  [--reuse | --reuse-teachers]
                                  [--teacher-steps S] [--per-class 100]

Zoo teachers (16x16 MNIST-5k, DDPMPipeline folders in benchmarks/runs/zoo/NAME/pipeline):
- trained by `benchmarks/foreign_teacher.py`, a plain-diffusers script that imports nothing of dstudio (diffusers'
  default block kinds, `DDPMScheduler.add_noise`, `EMAModel`, `DDPMPipeline.save_pretrained`): the classic
  unconditional DDPM (eps, linear betas, clip_sample, leading spacing) and an SD3-style flow-matching model
  (logit-normal times);
- trained by `dstudio teacher train --preset full --steps S --set trainer.batch_size=128 --set method.layout=diffusers
  OPTIONS` (the shipped teacher's recipe, 6,000 x 128): eps / cosine / clip_sample, v / zero terminal SNR, x0 / linear.
Each student is `dstudio distill METHOD --preset quick --teacher benchmarks/runs/zoo/NAME/pipeline` (consistency with
`--init teacher`, measured at 2 NFE, the others at 1). Rows: the teacher at 50 steps (trailing DDIM with its clip for
DDPM teachers, its own Euler for flow matching) and each student, on the protocol's noise, FID in the `mnist` space
(the digit classifier) and the `pixels` space (raw pixel statistics: speckle and texture a classifier ignores), each
with its ratio to that teacher. An unconditional teacher's class counts are a multinomial draw rather than exactly
100 per class, which alone puts the shipped teacher at about 1.8x its balanced FID-mnist on 1,000 images: zoo
teachers are held to the shipped teacher sampled as they are (balanced labels for class-conditional ones, the mean
over 20 random-label draws for unconditional ones). --reuse evaluates finished runs instead of training them again.
Writes benchmarks/results/teachers.json and its table in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from dstudio.app.benchmark import RESULTS, merge_rows, source_commit, trained_at, write_results
from dstudio.distill.core.images import collapse_reason, save_grid, to_uint8
from dstudio.distill.core.teacher import load_pipeline, reference_scheduler
from dstudio.distill.evaluation.fid import fid_of_tensor
from dstudio.distill.evaluation.interval import fid_fields
from dstudio.distill.evaluation.protocol import is_conditional, pipeline_images, protocol_fingerprint, protocol_for, \
    protocol_inputs
from dstudio.distill.evaluation.spaces import feature_space, tensor_features
from dstudio.distill.evaluation.stats import Stats, frechet, reference_stats

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "zoo"
SPACES = ("mnist", "pixels")
LABEL_DRAWS = 20  # class-count draws averaged in the shipped teacher's unconditional reference


@dataclass(frozen=True)
class Recipe:
    """How a zoo teacher is trained: by `dstudio teacher train` with `options` (`--set` keys), or by
    foreign_teacher.py's `kind` with `options` as its extra arguments."""

    options: tuple[str, ...] = ()
    foreign: str | None = None
    steps: int = 6000
    batch: int = 128

    def command(self, out: Path, steps: int | None = None) -> list[str]:
        steps = steps or self.steps
        if self.foreign:
            return [sys.executable, str(ROOT / "foreign_teacher.py"), "--kind", self.foreign, "--steps", str(steps),
                    "--batch", str(self.batch), *self.options, "--out", str(out)]
        sets = [a for o in self.options for a in ("--set", o)]
        return [sys.executable, "-m", "dstudio.app.cli", "teacher", "train", "--preset", "full", "--steps", str(steps),
                "--set", f"trainer.batch_size={self.batch}", "--set", "method.layout=diffusers", *sets, "--out",
                str(out)]


ZOO = {
    "eps-uncond": Recipe(("--lr-schedule", "constant", "--warmup", "0"), foreign="eps-linear", steps=8000),
    "flow": Recipe(foreign="flow", steps=8000),
    "eps-cosine": Recipe(("method.prediction_type=epsilon", "method.clip_sample=true"), steps=10000),
    "v-zero-snr": Recipe(("method.prediction_type=v_prediction", "method.rescale_betas_zero_snr=true")),
    "sample-linear": Recipe(("method.prediction_type=sample", "method.beta_schedule=linear")),
}
# student: (extra CLI arguments, NFE measured)
STUDENTS = {"dmd2": ([], 1), "sim": ([], 1), "rectified_flow": ([], 1), "consistency": (["--init", "teacher"], 2)}


def run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in `log`; the wall time in seconds."""
    print(" ".join(cmd), file=sys.stderr)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def finished(run_dir: Path) -> bool:
    return (run_dir / "pipeline" / "model_index.json").is_file()


def trained_steps(run_dir: Path) -> int:
    for name, key in (("config.yaml", None), ("recipe.json", "steps")):
        if (run_dir / name).is_file():
            text = (run_dir / name).read_text()
            return yaml.safe_load(text)["trainer"]["steps"] if key is None else json.loads(text)[key]
    return 0


def train_teacher(name: str, steps: int | None, reuse: bool) -> tuple[Path, float | None]:
    run_dir, recipe = RUNS / name, ZOO[name]
    if reuse and finished(run_dir):
        return run_dir, None
    cmd = recipe.command(run_dir, steps)
    if not recipe.foreign:  # a folder without a checkpoint holds nothing to keep
        cmd.append("--resume" if (run_dir / "checkpoint.pt").is_file() else "--overwrite")
    return run_dir, run(cmd, RUNS / f"{name}.log")


def student_command(teacher_run: Path, method: str) -> list[str]:
    out = teacher_run.parent / f"{teacher_run.name}-{method}"
    return ["dstudio", "distill", method, "--preset", "quick", *STUDENTS[method][0], "--teacher",
            str(teacher_run / "pipeline"), "--out", str(out), "--eval-per-class", "0", "--overwrite"]


def train_student(teacher_run: Path, method: str, reuse: bool) -> tuple[Path, float | None]:
    out = teacher_run.parent / f"{teacher_run.name}-{method}"
    if reuse and finished(out):
        return out, None
    cmd = [sys.executable, "-m", "dstudio.app.cli", *student_command(teacher_run, method)[1:]]
    return out, run(cmd, teacher_run.parent / f"{out.name}.log")


def callable_pipeline(pipe, reference: bool = False):
    """A pipeline for the protocol; with `reference`, on the teacher's 50-step scheduler."""
    if reference:
        pipe.scheduler = reference_scheduler(pipe.scheduler)
    return pipe


def label_draws(n: int, per_class: int, draws: int = LABEL_DRAWS, seed: int = 0) -> list[torch.Tensor]:
    """Indices into a pool of `per_class` images per class (class c at c * per_class ...): per draw, the first counts[c]
    of class c, counts ~ Multinomial(n, 1/10) (capped at per_class) as an unconditional teacher's class counts are."""
    rng, out = torch.Generator().manual_seed(seed), []
    for _ in range(draws):
        counts = torch.bincount(torch.randint(0, 10, (n,), generator=rng), minlength=10).clamp(max=per_class)
        out.append(torch.cat([c * per_class + torch.arange(int(k)) for c, k in enumerate(counts)]))
    return out


def random_label_fids(pipe, n: int, spaces: dict, refs: dict, draws: int = LABEL_DRAWS) -> dict[str, list[float]]:
    """The class-conditional `pipe`'s 50-step FIDs (space -> one per draw) on `n` images whose class counts are drawn
    as an unconditional teacher's are (label_draws) instead of exactly n/10 each: the reference an unconditional
    teacher is held to."""
    per_class = n // 10 + n // 20  # 1.5x: a Binomial(n, 0.1) count passes it with p < 1e-6 for n = 1,000
    labels, noise = protocol_inputs(pipe, per_class)
    with torch.no_grad():
        images, _ = pipeline_images(pipe, labels, noise, 50)
    feats = {name: tensor_features(images, space) for name, space in spaces.items()}
    return {name: [frechet(Stats.of(feats[name][idx.numpy()], name, "random labels", keep_feats=False), refs[name])
                   for idx in label_draws(n, per_class, draws)] for name in spaces}


def class_imbalance(images: torch.Tensor, space) -> float:
    """Total variation between the digit classifier's class histogram of `images` (in [-1, 1]) and the uniform one:
    0 for balanced classes, 0.9 when every image is one digit (what FID-mnist sees of mode dropping)."""
    with torch.no_grad():
        digits = space.model.logits(to_uint8(images).to(space.device)).argmax(-1).cpu()
    return float((torch.bincount(digits, minlength=10) / len(digits) - 0.1).abs().sum() / 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(ZOO), default=list(ZOO))
    p.add_argument("--students", nargs="*", choices=list(STUDENTS), default=list(STUDENTS))
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs instead of training them again")
    p.add_argument("--reuse-teachers", action="store_true",
                   help="evaluate finished teachers instead of training them again, but train the students")
    p.add_argument("--teacher-steps", type=int, default=None, help="default: each recipe's (ZOO)")
    p.add_argument("--per-class", type=int, default=100)
    args = p.parse_args(argv)
    commit = source_commit()  # the code that trains the rows, whatever the checkout holds when they are written

    rows, grids = [], RESULTS / "teachers"
    shipped = load_pipeline(None)
    proto = protocol_for(shipped, args.per_class)
    labels, noise = proto["labels"], proto["noise"]
    spaces = {n: feature_space(n, "cpu") for n in SPACES}
    refs = {n: reference_stats("mnist", spaces[n], noise.shape[-1]) for n in SPACES}

    def measure(name, pipe, nfe, base=None, **extra):
        with torch.no_grad():
            images, seconds = pipeline_images(pipe, labels, noise, nfe)
        row = {"name": name, "nfe": nfe, "images_per_s": len(images) / seconds, "collapse": collapse_reason(images),
               "class_tv": class_imbalance(images, spaces["mnist"]), **extra}
        for n in SPACES:
            row.update(fid_fields(fid_of_tensor(images, refs[n], spaces[n], name), f"fid_{n}"))
            if base is not None:
                row[f"x_{n}"] = row[f"fid_{n}"] / base[f"fid_{n}"]
        save_grid(images[::args.per_class // 10][:100], grids / f"{name}.png", nrow=10, upscale=2)
        rows.append(row)
        print(f"{name:>32}  {nfe:>2} NFE  " + "  ".join(f"FID-{n} {row[f'fid_{n}']:.4f}" for n in SPACES),
              file=sys.stderr)
        return row

    shipped_row = measure("shipped-teacher-50", callable_pipeline(shipped, reference=True), 50, teacher="shipped",
                          method="teacher", command="dstudio teacher train --preset full (distill/assets)")
    # an unconditional teacher's class counts are a multinomial draw: about 1.8x the balanced FID-mnist on 1,000
    # images for the shipped teacher itself, so unconditional teachers are held to the shipped teacher sampled so
    draws = {n: torch.tensor(f) for n, f in random_label_fids(shipped, len(labels), spaces, refs).items()}
    unconditional_row = {"name": "shipped-teacher-50-random-labels", "nfe": 50, "teacher": "shipped",
                         "method": "teacher, random labels", "draws": LABEL_DRAWS,
                         **{f"fid_{n}": float(f.mean()) for n, f in draws.items()},
                         **{f"fid_{n}_sd": float(f.std()) for n, f in draws.items()},
                         **{f"x_{n}": float(f.mean()) / shipped_row[f"fid_{n}"] for n, f in draws.items()},
                         "command": "benchmarks/teachers.py: random_label_fids (mean of the draws)"}
    rows.append(unconditional_row)
    print("shipped teacher, random labels: " + "  ".join(
        f"FID-{n} {unconditional_row[f'fid_{n}']:.4f} +- {unconditional_row[f'fid_{n}_sd']:.4f}" for n in SPACES),
        file=sys.stderr)
    for name in args.only:
        teacher_run, teacher_seconds = train_teacher(name, args.teacher_steps, args.reuse or args.reuse_teachers)
        teacher = callable_pipeline(load_pipeline(teacher_run / "pipeline"), reference=True)
        conditional = is_conditional(teacher)
        t_row = measure(f"{name}-teacher-50", teacher, 50, base=shipped_row if conditional else unconditional_row,
                        teacher=name, method="teacher", shipped_reference="balanced" if conditional else "random labels",
                        trained=trained_at(teacher_run),
                        train_minutes=teacher_seconds and teacher_seconds / 60,
                        teacher_steps=trained_steps(teacher_run),
                        command=" ".join(ZOO[name].command(teacher_run, args.teacher_steps)[1:]).replace(
                            str(ROOT.parent) + "/", ""))
        for method in args.students:
            run_dir, seconds = train_student(teacher_run, method, args.reuse)
            nfe = STUDENTS[method][1]
            measure(f"{name}-{method}-{nfe}", callable_pipeline(load_pipeline(run_dir / "pipeline")), nfe,
                    base=t_row, teacher=name, method=method, train_minutes=seconds and seconds / 60,
                    trained=trained_at(run_dir),
                    command=" ".join(student_command(teacher_run, method)).replace(str(ROOT.parent) + "/", ""))
    previous = RESULTS / "teachers.json"
    if previous.is_file():  # rows not measured again (other teachers or students) stay, with their date and commit
        old = json.loads(previous.read_text())
        rows = merge_rows(rows, old["rows"], old["date"], key=lambda r: (r["teacher"], r["method"]),
                          commit=old.get("commit"))
    write_results("teachers", {"commit": commit,
        "command": "python benchmarks/teachers.py" + ("" if argv is None else " " + " ".join(argv)),
        "protocol": {"per_class": args.per_class, "noise_seed": 0, "features": list(SPACES),
                     "reference": {n: refs[n].source for n in SPACES}},
        "teacher_training": {n: {"command": " ".join(r.command(RUNS / n)[1:]), "steps": r.steps} for n, r in ZOO.items()},
        "fingerprint": {n: protocol_fingerprint(spaces[n], refs[n], args.per_class) for n in SPACES},
        "floor": proto["floor"], "rows": rows,
        "columns": [["name", "row"], ["nfe", "NFE"], ["fid_mnist", "FID-mnist"], ["x_mnist", "x its teacher"],
                    ["fid_pixels", "FID-pixels"], ["x_pixels", "x its teacher (pixels)"],
                    ["class_tv", "class imbalance"], ["shipped_reference", "teacher held to"],
                    ["collapse", "collapse check"], ["teacher_steps", "teacher steps"],
                    ["train_minutes", "training minutes"], ["trained", "trained (export date)"],
                    ["measured", "earlier run"]],
        "notes": ["zoo teachers: 16x16 MNIST-5k; teacher rows' ratios are to the shipped teacher at 50 steps, "
                  "student rows' to their own teacher at 50 steps",
                  "an unconditional teacher's class counts are a multinomial draw, not exactly 100 per class: its "
                  "ratio is to the shipped teacher sampled with random labels (mean of the draws, "
                  "shipped-teacher-50-random-labels), a class-conditional teacher's to the balanced shipped row",
                  "students: the quick presets, unchanged, on each teacher (consistency --init teacher at 2 NFE)",
                  "each row's `command` reproduces it; training minutes: wall time on this machine while other jobs "
                  "shared its cores"],
    })
    print(f"wrote {RESULTS / 'teachers.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
