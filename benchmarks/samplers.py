"""The teacher with stock few-step solvers: FID-mnist and images/s at 1, 2, 4, 8, 16 and 50 NFE.

    python benchmarks/samplers.py [--teacher PATH] [--nfe 1 2 4 8 16 50] [--quick]

Writes benchmarks/results/samplers.json, the FID-vs-NFE plot and the table in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dstudio.app.benchmark import RESULTS, STOCK_SOLVERS, fid_vs_nfe_plot, stock_scheduler, write_results
from dstudio.distill.core.images import save_grid
from dstudio.distill.core.teacher import DEFAULT_TEACHER, load_pipeline
from dstudio.distill.evaluation.fid import fid_of_tensor
from dstudio.distill.evaluation.interval import fid_fields
from dstudio.distill.evaluation.protocol import pipeline_images, protocol_fingerprint, protocol_for
from dstudio.samplers import SearchedScheduler, scheduler_from_teacher

# Align Your Steps' 10-step list for SD1.5 (diffusers' AysSchedules); optimised for another schedule, shown as is.
AYS_SD_10 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 50])
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args(argv)

    pipe = load_pipeline(args.teacher)
    base = pipe.scheduler.config
    proto = protocol_for(pipe, args.per_class)
    labels, noise, space, ref, floor = (proto[k] for k in ("labels", "noise", "space", "ref", "floor"))
    grids = RESULTS / "samplers"

    runs = [(name, nfe) for nfe in args.nfe for name in STOCK_SOLVERS] + [("ays-sd10-ddim", 10)]
    rows = []
    for name, nfe in runs:
        if name == "ays-sd10-ddim":
            pipe.scheduler = scheduler_from_teacher(SearchedScheduler, pipe.scheduler, timesteps=AYS_SD_10)
            steps = None
        else:  # every stock solver here spends one network evaluation per step
            pipe.scheduler = stock_scheduler(name, base)
            steps = nfe
        row = {"name": f"{name}-{nfe}", "sampler": name, "nfe": nfe}
        try:
            with torch.no_grad():
                images, seconds = pipeline_images(pipe, labels, noise, steps, args.batch_size)
        except Exception as e:  # a stock solver that cannot run at this NFE is a row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            rows.append(row)
            print(row, file=sys.stderr)
            continue
        r = fid_of_tensor(images, ref, space, row["name"])
        row.update(**fid_fields(r), kid=r["kid"], images_per_s=len(images) / seconds, seconds=seconds)
        if nfe in (4, 50) and name in ("ddim", "dpmpp-2m"):
            save_grid(images[::args.per_class // 10][:100], grids / f"{row['name']}.png", nrow=10, upscale=2)
            row["grid"] = str((grids / f"{row['name']}.png").relative_to(RESULTS.parent.parent))
        rows.append(row)
        print(f"{row['name']:>20}  FID {row['fid']:.4f}  {row['images_per_s']:.0f} img/s", file=sys.stderr)

    teacher50 = next((r for r in rows if r["name"] == "ddim-50" and "fid" in r), None)
    for r in rows:
        if teacher50 and "fid" in r:
            r["fid_vs_teacher"] = r["fid"] / teacher50["fid"]
            r["speedup"] = r["images_per_s"] / teacher50["images_per_s"]
    plot = fid_vs_nfe_plot([r for r in rows if r["sampler"] != "ays-sd10-ddim"], RESULTS / "samplers.png",
                           "shipped MNIST teacher: stock solvers", floor)
    write_results("samplers", {
        "command": "python benchmarks/samplers.py" + ("" if argv is None else " " + " ".join(argv)),
        "teacher": args.teacher, "protocol": {"per_class": args.per_class, "noise_seed": 0, "features": "mnist",
                                              "reference": ref.source},
        "fingerprint": {space.name: protocol_fingerprint(space, ref, args.per_class, args.batch_size)},
        "floor": floor, "rows": rows, "plot": str(plot.relative_to(RESULTS.parent.parent)),
        "columns": [["name", "row"], ["nfe", "NFE"], ["fid", "FID-mnist"], ["fid_vs_teacher", "x DDIM-50"],
                    ["kid", "KID"], ["images_per_s", "images/s"], ["speedup", "speed vs DDIM-50"], ["error", "error"]],
        "notes": ["speed is measured in this one run; ratios are against the DDIM-50 row",
                  "ddim-leading is diffusers' default DDIM spacing ([750, 500, 250, 0] at 4 steps); the others "
                  "use trailing spacing (first step at t = 999)",
                  "ays-sd10-ddim: Align Your Steps' SD1.5 list run with the DDIM rule, optimised for another "
                  "noise schedule, so no claim of optimality here"],
    })
    print(f"wrote {RESULTS / 'samplers.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
