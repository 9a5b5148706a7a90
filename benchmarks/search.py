"""AutoDiffusion on the shipped teacher: searched time steps and solver against every stock solver at the same NFE.

    python benchmarks/search.py --nfe 4            # writes results/search-4.json
    python benchmarks/search.py --nfe 8            # writes results/search-8.json
    python benchmarks/search.py --nfe 4 --stage2 --skip-budget 0.15   # writes results/search-stage2.json

The search runs with `dstudio search`'s defaults (solver part of the candidate; every candidate screened on 250
images from noise seed 1000, the leaders re-scored on 1,000) and scores its candidates on its own noise; every
row here is re-scored on the protocol's 2,000 images from fresh noise (seed 0). Stock rows already measured by
benchmarks/samplers.py (same teacher, noise and code path: FIDs are deterministic) are reused for their FID, and
one of them (UniPC) is re-measured here to check that. `--teacher` takes any class-conditional teacher (the hook
for the zoo's teachers; FIDs are then against MNIST-5k only if the teacher draws MNIST).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dstudio.app.benchmark import (RESULTS, pipeline_images, protocol_labels, protocol_noise, real_floor,
                                   stock_scheduler, write_results)
from dstudio.app.fid import fid_of_tensor
from dstudio.app.search_cli import FIDFitness
from dstudio.distill.core.teacher import DEFAULT_TEACHER, load_teacher
from dstudio.samplers import SearchedScheduler, scheduler_from_teacher
from dstudio.samplers.samplers import distinct_solvers
from dstudio.search import Candidate, EvolutionConfig, SearchSpace, evolve

SOLVERS = ["unipc-2", "unipc-3", "dpmpp-2m", "dpmpp-3m"]
# stock solvers not in benchmarks/samplers.py: name -> (class, overrides)
EXTRA_STOCK = {"dpmpp-3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                             "timestep_spacing": "trailing"}),
               "unipc-3": ("UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"})}
COLUMNS = [["name", "row"], ["nfe", "NFE"], ["fid", "FID-mnist"], ["fid_vs_teacher", "x teacher-50"],
           ["fid_vs_unipc", "x stock UniPC"], ["fid_vs_trailing_ddim", "x trailing DDIM"], ["images_per_s", "images/s"],
           ["search_fid", "search FID"], ["search_cpu_min", "search CPU-min"], ["evaluations", "candidates"],
           ["steps", "steps"]]


def best_per_solver(history: list[dict]) -> dict[str, tuple[Candidate, int, float]]:
    """Per solver, the candidate ranked first by the search (highest rung reached, then its score there)."""
    scores: dict[str, list[float]] = {}
    cands: dict[str, Candidate] = {}
    for h in history:
        c = Candidate.from_json(h["candidate"])
        cands[c.key()] = c
        scores.setdefault(c.key(), []).append(h["fitness"])
    best = {}
    for k in sorted(scores, key=lambda k: (-len(scores[k]), scores[k][-1])):
        best.setdefault(cands[k].solver, (cands[k], len(scores[k]) - 1, scores[k][-1]))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--screen-samples", type=int, default=250)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--check-reuse", action="store_true", help="re-measure stock UniPC to check the reused FIDs")
    p.add_argument("--baseline-candidates", type=int, default=6,
                   help="candidates scored the old way (DDIM, 500 images each, no halving or cache) for candidates/min")
    args = p.parse_args(argv)
    command = "python benchmarks/search.py" + " ".join([""] + (sys.argv[1:] if argv is None else argv))

    teacher = load_teacher(args.teacher)
    pipe, T, nfe = teacher.pipeline, teacher.num_train_timesteps, args.nfe
    base = pipe.scheduler.config
    labels = protocol_labels()
    noise = protocol_noise(teacher.sample_shape, len(labels))
    protocol = FIDFitness(teacher, len(labels), labels=labels, noise=noise, cache_mb=0)

    def rescore(name, sampler, steps_n, scheduler, **extra):
        pipe.scheduler = scheduler
        with torch.no_grad():
            images, seconds = pipeline_images(pipe, labels, noise, None if isinstance(scheduler, SearchedScheduler)
                                              else steps_n)
        r = fid_of_tensor(images, protocol.ref, protocol.space, name)
        row = {"name": name, "sampler": sampler, "nfe": steps_n, "fid": r["fid"],
               "images_per_s": len(images) / seconds, **extra}
        print(f"{name:>28}  FID {row['fid']:.4f}  {row['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
        return row

    reused = {}
    if args.teacher == str(DEFAULT_TEACHER):
        previous = json.loads((RESULTS / "samplers.json").read_text())
        reused = {r["name"]: r for r in previous["rows"]}
    rows = []
    for name in ("ddim-50", f"ddim-{nfe}", f"ddim-leading-{nfe}", f"dpmpp-2m-{nfe}", f"unipc-{nfe}", f"euler-{nfe}"):
        if name in reused:
            r = reused[name]
            rows.append({"name": "teacher-ddim-50" if name == "ddim-50" else name, "sampler": r["sampler"],
                         "nfe": r["nfe"], "fid": r["fid"], "reused": "benchmarks/samplers.py " + previous["date"]})
        else:
            solver = name.rsplit("-", 1)[0]
            rows.append(rescore(name if name != "ddim-50" else "teacher-ddim-50", solver, int(name.rsplit("-", 1)[1]),
                                stock_scheduler(solver, base)))
    check = None
    if args.check_reuse:
        check = rescore(f"unipc-{nfe} (re-measured)", "unipc", nfe, stock_scheduler("unipc", base))
        rows.append(check)
    solvers = distinct_solvers(SOLVERS, nfe)

    # the search, as `dstudio search --nfe N` runs it
    fitness = FIDFitness(teacher, args.num_samples, rungs=[args.screen_samples], promote=3)
    space = SearchSpace(T, nfe, solvers=tuple(solvers))
    cfg = EvolutionConfig(population=args.population, generations=args.generations, top_k=10,
                          mutations=min(25, args.population // 2), crossovers=min(15, args.population // 4), seed=0)
    state = RESULTS.parent / "runs" / f"search-{nfe}" / "search_state.json"
    state.parent.mkdir(parents=True, exist_ok=True)

    def progress(gen, i, best):
        print(f"generation {gen + 1}/{cfg.generations}, candidate {i}: best {best:.4f}", file=sys.stderr, flush=True)

    cpu0, t0 = time.process_time(), time.time()
    result = evolve(fitness, space, cfg, checkpoint=state, resume=True, progress=progress)  # CPU: this process only
    cpu_s, wall_s = time.process_time() - cpu0, time.time() - t0
    print(f"search: {result.evaluations} candidates, {cpu_s / 60:.1f} CPU-min, {wall_s / 60:.1f} min", file=sys.stderr)
    per_solver = best_per_solver(result.history)
    searched = [(result.best.solver, per_solver[result.best.solver])]  # the search's pick first
    searched += [(s, v) for s, v in sorted(per_solver.items()) if s != result.best.solver]
    stats = dict(search_cpu_min=cpu_s / 60, search_wall_min=wall_s / 60, evaluations=result.evaluations,
                 scorings=len(result.history), cache_hit_rate=fitness.cache.hits / max(1, fitness.cache.calls))
    notes = [f"search: population {args.population}, {args.generations} generations, solvers {', '.join(solvers)} "
             f"(part of the candidate), every candidate screened on {args.screen_samples} images (noise seed 1000), "
             f"the 3 best per generation re-scored on {args.num_samples}; one row per solver: its best candidate of "
             f"the one joint search, re-scored on the 2,000-image protocol (noise seed 0) through the exported "
             f"SearchedScheduler in the pipeline",
             f"search cost: {cpu_s / 60:.1f} CPU-minutes ({wall_s / 60:.1f} wall minutes on a shared machine), "
             f"{result.evaluations} candidates, {len(result.history)} scorings, denoiser-cache hit rate "
             f"{stats['cache_hit_rate']:.0%}"]

    def write():
        by = {r["name"]: r for r in rows}
        teacher50, unipc, ddim = by["teacher-ddim-50"], by[f"unipc-{nfe}"], by[f"ddim-{nfe}"]
        for r in rows:
            r["fid_vs_teacher"] = r["fid"] / teacher50["fid"]
            if r["sampler"].startswith("searched"):
                r["fid_vs_unipc"] = r["fid"] / unipc["fid"]
                r["fid_vs_trailing_ddim"] = r["fid"] / ddim["fid"]
        write_results(f"search-{nfe}", {
            "command": command, "teacher": args.teacher, "floor": floor, "best": result.best.to_json(),
            "rows": rows, "notes": notes, "columns": COLUMNS,
        })

    floor = real_floor(protocol.space, protocol.ref, teacher.sample_shape[-1])["fid"]
    for solver, (c, rung, f) in searched:
        sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=list(c.steps), solver=solver)
        best = c.key() == result.best.key()
        rows.append(rescore(f"searched-{solver}-{nfe}", f"searched {solver}", nfe, sched, steps=str(list(c.steps)),
                            search_fid=f, search_rung_images=fitness.rungs[rung], best_overall=best,
                            **(stats if best else {})))
        write()
    for name, (cls, overrides) in EXTRA_STOCK.items():
        import diffusers

        if name in solvers:  # else it runs the same orders as a stock row above at this NFE
            rows.append(rescore(f"{name}-{nfe}", name, nfe, getattr(diffusers, cls).from_config(base, **overrides)))
            write()
    if args.baseline_candidates:  # candidates per CPU-minute, the old way: DDIM only, 500 images, no halving or cache
        old = FIDFitness(teacher, 500, cache_mb=0)
        sample = [Candidate.from_json(h["candidate"]) for h in result.history[:args.baseline_candidates]]
        c0 = time.process_time()
        for c in sample:
            old(Candidate(c.steps))
        old_rate = len(sample) / ((time.process_time() - c0) / 60)
        new_rate = result.evaluations / (cpu_s / 60)
        notes.append(f"throughput: {old_rate:.1f} candidates per CPU-minute before (500 images each, no cache; "
                     f"{len(sample)} candidates timed), {new_rate:.1f} after (successive halving 250 -> "
                     f"{args.num_samples}, cached evaluations and features), {new_rate / old_rate:.1f}x")

    by = {r["name"]: r for r in rows}
    unipc = by[f"unipc-{nfe}"]
    if len(solvers) < len(SOLVERS):
        notes.append(f"at {nfe} NFE {', '.join(s for s in SOLVERS if s not in solvers)} run the same per-step orders "
                     f"as {', '.join(solvers)} (diffusers lowers the order of the first and last steps), so neither "
                     f"the search nor the stock rows repeat them")
    if check is not None:
        same = abs(check["fid"] - unipc["fid"]) <= 1e-6 * max(1.0, unipc["fid"])
        notes.append(f"re-measured unipc-{nfe}: FID {check['fid']:.6f} against the reused {unipc['fid']:.6f} "
                     f"({'reproduced' if same else 'DIFFERENT'})")
    write()
    print(f"wrote {RESULTS / f'search-{nfe}.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
