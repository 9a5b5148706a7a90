"""AutoDiffusion on the shipped teacher: searched time steps vs uniform solvers at the same NFE.

    python benchmarks/search.py [--nfe 4 8] [--num-samples 500] [--population 30] [--generations 8] [--no-stage2]

The search scores candidates on its own noise (seed 1000); every row here is re-scored on the protocol's
2,000 images from fresh noise (seed 0). Stage two (4 NFE) adds per-step skipped blocks and reports the
measured sampling speed-up over the stage-one schedule through the same sampler.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dstudio.app.benchmark import (RESULTS, pipeline_images, protocol_labels, protocol_noise,
                           real_floor, stock_scheduler, timed, write_results)
from dstudio.app.fid import fid_of_tensor
from dstudio.app.search_cli import FIDFitness
from dstudio.distill.core.teacher import DEFAULT_TEACHER, load_teacher
from dstudio.samplers import SearchedScheduler, scheduler_from_teacher
from dstudio.search import Candidate, EvolutionConfig, SearchSpace, evolve
from dstudio.search.skip import skippable_blocks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 8])
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--skip-budget", type=float, default=0.5)
    p.add_argument("--no-stage2", action="store_true")
    p.add_argument("--reuse-stage1", action="store_true",
                   help="keep the stage-one rows of results/search.json and rerun only stage two")
    args = p.parse_args(argv)

    teacher = load_teacher(args.teacher)
    pipe, T = teacher.pipeline, teacher.num_train_timesteps
    base = pipe.scheduler.config
    labels = protocol_labels()
    noise = protocol_noise(teacher.sample_shape, len(labels))
    fitness = {}
    protocol = None

    def rescore(name, sampler, nfe, scheduler=None, candidate=None, **extra):
        """Protocol FID and images/s: stock and searched schedules through the pipeline, skips through the sampler."""
        if candidate is not None:
            with torch.no_grad():
                images, seconds = timed(protocol.images, candidate)
        else:
            pipe.scheduler = scheduler
            with torch.no_grad():
                images, seconds = pipeline_images(pipe, labels, noise, None if isinstance(scheduler, SearchedScheduler)
                                                  else nfe)
        r = fid_of_tensor(images, protocol.ref, protocol.space, name)
        row = {"name": name, "sampler": sampler, "nfe": nfe, "fid": r["fid"], "images_per_s": len(images) / seconds,
               **extra}
        print(f"{name:>28}  FID {row['fid']:.4f}  {row['images_per_s']:.0f} img/s", file=sys.stderr)
        return row

    protocol = FIDFitness(teacher, "ddim", len(labels), labels=labels, noise=noise)
    searches = {}
    if args.reuse_stage1:
        import json

        previous = json.loads((RESULTS / "search.json").read_text())
        rows = [r for r in previous["rows"] if not r["name"].startswith("stage")]
        best4 = next(r for r in rows if r["name"] == "searched-ddim-4")
        searches[4] = type("Stage1", (), {"best": Candidate(tuple(json.loads(best4["steps"])))})
        fitness[4] = FIDFitness(teacher, "ddim", args.num_samples)
        args.nfe = []
    else:
        rows = [rescore("teacher-ddim-50", "ddim", 50, stock_scheduler("ddim", base))]
    for nfe in args.nfe:
        fitness[nfe] = FIDFitness(teacher, "ddim", args.num_samples)
        cfg = EvolutionConfig(population=args.population, generations=args.generations, top_k=10,
                              mutations=args.population // 2, crossovers=args.population // 4, seed=0)
        t0 = time.time()
        result = evolve(fitness[nfe], SearchSpace(T, nfe), cfg)
        search_s = time.time() - t0
        searches[nfe] = result
        sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=list(result.best.steps))
        rows.append(rescore(f"searched-ddim-{nfe}", "searched", nfe, sched, search_seconds=search_s,
                            steps=str(list(result.best.steps)), evaluations=result.evaluations,
                            search_fid=result.best_fitness))
        for name in ("ddim", "ddim-leading", "dpmpp-2m", "unipc"):
            rows.append(rescore(f"{name}-{nfe}", name, nfe, stock_scheduler(name, base)))

    notes = [f"search: population {args.population}, {args.generations} generations, top-k 10, "
             f"{args.num_samples} images per candidate (noise seed 1000), DDIM rule; rows re-scored on the "
             f"2,000-image protocol (noise seed 0)"]
    if not args.no_stage2 and 4 in searches:
        blocks = tuple(skippable_blocks(teacher.unet))
        stage1 = Candidate(searches[4].best.steps, tuple(frozenset() for _ in searches[4].best.steps))
        space = SearchSpace(T, 4, blocks, int(args.skip_budget * len(blocks) * 4))
        # stage two keeps the searched steps fixed in its first member and searches steps and skips jointly
        cfg = EvolutionConfig(population=args.population, generations=args.generations + 4, top_k=10,
                              mutations=args.population // 2, crossovers=args.population // 4, seed=0)
        t0 = time.time()
        result = evolve(fitness[4], space, cfg, init=[stage1])
        search_s = time.time() - t0
        one = rescore("stage1-ddim-4 (sampler)", "searched", 4, candidate=stage1)
        two = rescore("stage2-skip-ddim-4", "searched+skip", 4, candidate=result.best, search_seconds=search_s,
                      steps=str(list(result.best.steps)), skipped_blocks=result.best.n_skipped,
                      evaluations=result.evaluations, search_fid=result.best_fitness)
        two["speedup_vs_stage1"] = two["images_per_s"] / one["images_per_s"]
        two["fid_vs_stage1"] = two["fid"] / one["fid"]
        rows += [one, two]
        notes.append(f"stage two: {len(blocks)} skippable blocks, budget {space.max_skipped} skipped block-steps "
                     f"opened by max/5 per generation; speed-up and FID ratio measured against stage one through the "
                     f"same pure DDIM sampler")

    teacher50 = rows[0]
    for r in rows:
        r["fid_vs_teacher"] = r["fid"] / teacher50["fid"]
        r["speedup"] = r["images_per_s"] / teacher50["images_per_s"]
    for nfe in sorted({int(r["nfe"]) for r in rows if r["name"].startswith("searched-")}):
        trailing = next(r for r in rows if r["name"] == f"ddim-{nfe}")
        searched = next(r for r in rows if r["name"] == f"searched-ddim-{nfe}")
        searched["fid_vs_trailing_ddim"] = searched["fid"] / trailing["fid"]
    write_results("search", {
        "command": "python benchmarks/search.py" + " ".join([""] + (sys.argv[1:] if argv is None else argv)),
        "teacher": args.teacher, "floor": real_floor(protocol.space, protocol.ref, teacher.sample_shape[-1])["fid"],
        "rows": rows, "notes": notes,
        "columns": [["name", "row"], ["nfe", "NFE"], ["fid", "FID-mnist"], ["fid_vs_teacher", "x teacher-50"],
                    ["fid_vs_trailing_ddim", "x trailing DDIM"], ["images_per_s", "images/s"],
                    ["speedup_vs_stage1", "speed-up vs stage 1"], ["fid_vs_stage1", "FID x stage 1"],
                    ["search_seconds", "search s"], ["evaluations", "candidates"], ["steps", "steps"]],
    })
    print(f"wrote {RESULTS / 'search.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
