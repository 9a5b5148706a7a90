"""AutoDiffusion: searched time steps and solver against every stock solver at the same NFE, on any teacher.

    python benchmarks/search.py --nfe 4            # writes results/search-4.json
    python benchmarks/search.py --nfe 8            # writes results/search-8.json
    python benchmarks/search.py --nfe 4 --stage2   # writes results/search-stage2-4.json
    python benchmarks/search.py --nfe 4 --teacher benchmarks/runs/zoo/flow/pipeline   # results/search-4-flow.json

The search runs with `dstudio search`'s defaults (solver part of the candidate; every candidate screened on 250
images from noise seed 1000, the leaders re-scored on 1,000) and scores its candidates on its own noise; every
row here is re-scored on the protocol's 2,000 images from fresh noise (seed 0). Stock rows already measured by
benchmarks/samplers.py (same teacher, noise and code path: FIDs are deterministic) are reused for their FID, and
one of them (UniPC) is re-measured here to check that (`--check-reuse`); on another teacher, the 50-step row of
this script's run at another NFE on that teacher is reused.

`--teacher` takes any MNIST-16 teacher dstudio loads: the zoo's (`python benchmarks/teachers.py` trains them into
benchmarks/runs/zoo/NAME/pipeline), unconditional ones included (their rows drop the labels), and flow-matching
ones, searched in their own noise fraction s and compared with FlowMatchEulerDiscreteScheduler and diffusers'
UniPC / DPM-Solver++ with `use_flow_sigmas`.

`--stage2` continues from the stage-one search (its checkpoint is reused) with skipped blocks under the compute
budget: `--nfe` x (1 - `--skip-budget`) full UNet forwards over all steps, blocks weighted by the MACs they save, up
to `--max-steps` steps (default NFE + 1), so skipped blocks can pay for an extra step. Rows: stage one's best and
stage two's best through the exported pipeline folder (FID, executed compute, images/s, and the speed-up of its
skips measured through that folder with and without them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dstudio.app.benchmark import RESULTS, stock_scheduler, write_results
from dstudio.app.search_cli import FIDFitness, export_skip_pipeline, pipeline_speedup, search_space
from dstudio.distill.core.teacher import DEFAULT_TEACHER, load_teacher
from dstudio.distill.evaluation.fid import fid_of_tensor
from dstudio.distill.evaluation.interval import fid_fields
from dstudio.distill.evaluation.protocol import pipeline_images, protocol_fingerprint, protocol_labels, \
    protocol_noise, real_floor
from dstudio.samplers import SearchedScheduler, scheduler_from_teacher
from dstudio.samplers.schedules import is_flow_matching
from dstudio.search import Candidate, EvolutionConfig, evolve

# stock solvers not in benchmarks/samplers.py: name -> (class, overrides)
EXTRA_STOCK = {"dpmpp-3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                             "timestep_spacing": "trailing"}),
               "unipc-3": ("UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"})}
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
_DPMPP = {**_FLOW, "algorithm_type": "dpmsolver++"}
FLOW_STOCK = {"euler": ("FlowMatchEulerDiscreteScheduler", {}),  # the flow teacher's own scheduler (= DDIM)
              "dpmpp-2m": ("DPMSolverMultistepScheduler", {**_DPMPP, "solver_order": 2}),
              "unipc": ("UniPCMultistepScheduler", {**_FLOW, "solver_order": 2}),
              "dpmpp-3m": ("DPMSolverMultistepScheduler", {**_DPMPP, "solver_order": 3}),
              "unipc-3": ("UniPCMultistepScheduler", {**_FLOW, "solver_order": 3})}
COLUMNS = [["name", "row"], ["nfe", "NFE"], ["compute_nfe", "executed NFE"], ["fid", "FID-mnist"],
           ["fid_vs_teacher", "x teacher-50"], ["fid_vs_unipc", "x stock UniPC"],
           ["fid_vs_trailing_ddim", "x trailing DDIM"], ["images_per_s", "images/s"], ["search_fid", "search FID"],
           ["search_cpu_min", "search CPU-min"], ["evaluations", "candidates"], ["steps", "steps"]]


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


def is_flow(teacher) -> bool:
    return is_flow_matching(teacher.scheduler.config)


def search_args(nfe: int, args, skip_blocks: bool = False):
    """`dstudio search`'s own arguments for this benchmark's settings: its defaults (the solvers) come from the CLI."""
    from dstudio.app.cli import build_parser

    argv = ["search", "--nfe", str(nfe), "--skip-budget", str(args.skip_budget)]
    argv += (["--skip-blocks"] if skip_blocks else []) + ([] if args.max_steps is None else ["--max-steps",
                                                                                             str(args.max_steps)])
    return build_parser().parse_args(argv)


def stock(name: str, teacher):
    """A stock diffusers scheduler by row name, configured from the teacher's own scheduler."""
    import diffusers

    base = teacher.scheduler.config
    if is_flow(teacher):
        cls, overrides = FLOW_STOCK[name]
        extra = {} if cls == "FlowMatchEulerDiscreteScheduler" else {"flow_shift": base["shift"]}
        return getattr(diffusers, cls).from_config(base, **overrides, **extra)
    if name in EXTRA_STOCK:
        cls, overrides = EXTRA_STOCK[name]
        return getattr(diffusers, cls).from_config(base, **overrides)
    return stock_scheduler(name, base)


def run_search(fitness, space, cfg, state: Path, budget=None, init=None, label: str = "search"):
    def progress(gen, i, best):
        print(f"{label}: generation {gen + 1}/{cfg.generations}, candidate {i}: best {best:.4f}", file=sys.stderr,
              flush=True)

    state.parent.mkdir(parents=True, exist_ok=True)
    cpu0, t0 = time.process_time(), time.time()
    result = evolve(fitness, space, cfg, budget, checkpoint=state, resume=True, init=init, progress=progress)
    cpu_s, wall_s = time.process_time() - cpu0, time.time() - t0  # CPU: this process only; 0 when fully resumed
    print(f"{label}: {result.evaluations} candidates, {cpu_s / 60:.1f} CPU-min, {wall_s / 60:.1f} min", file=sys.stderr)
    return result, cpu_s, wall_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--screen-samples", type=int, default=250)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--stage2", action="store_true", help="stage two after stage one: skipped blocks, compute budget")
    p.add_argument("--skip-budget", type=float, default=0.0,
                   help="stage two: share of --nfe's compute to save (0: same compute, skips pay for extra steps)")
    p.add_argument("--max-steps", type=int, default=None, help="stage two: most steps (default: --nfe + 1)")
    p.add_argument("--speed-images", type=int, default=250, help="stage two: images its speed-up is timed on")
    p.add_argument("--check-reuse", action="store_true", help="re-measure stock UniPC to check the reused FIDs")
    p.add_argument("--baseline-candidates", type=int, default=6,
                   help="candidates scored the old way (DDIM, 500 images each, no halving or cache) for candidates/min")
    args = p.parse_args(argv)
    command = "python benchmarks/search.py" + " ".join([""] + (sys.argv[1:] if argv is None else argv))

    teacher = load_teacher(args.teacher)
    nfe, flow = args.nfe, is_flow(teacher)
    default = args.teacher == str(DEFAULT_TEACHER)
    folder = Path(args.teacher)
    tag = "" if default else "-" + (folder.parent.name if folder.name == "pipeline" else folder.name)
    pipe = teacher.pipeline
    own = pipe.scheduler
    labels = protocol_labels()
    noise = protocol_noise(teacher.sample_shape, len(labels))
    protocol = FIDFitness(teacher, len(labels), labels=labels, noise=noise, cache_mb=0)

    def rescore(name, sampler, steps_n, scheduler, pipeline=None, **extra):
        target = pipeline  # unconditional pipelines: pipeline_images drops the labels
        if target is None:
            pipe.scheduler, target = scheduler, pipe
        try:
            with torch.no_grad():
                images, seconds = pipeline_images(target, labels, noise,
                                                  None if isinstance(scheduler, SearchedScheduler) else steps_n)
        finally:
            pipe.scheduler = own  # the teacher's scheduler: what stock and searched schedulers are configured from
        r = fid_of_tensor(images, protocol.ref, protocol.space, name)
        row = {"name": name, "sampler": sampler, "nfe": steps_n, **fid_fields(r),
               "images_per_s": len(images) / seconds, **extra}
        print(f"{name:>28}  FID {row['fid']:.4f}  {row['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
        return row

    # stock rows: the teacher at 50 steps, then every stock solver at this NFE (trailing spacing)
    teacher_row = "teacher-euler-50" if flow else "teacher-ddim-50"
    ddim_row = f"euler-{nfe}" if flow else f"ddim-{nfe}"  # Euler on a flow model is DDIM
    names = [("euler", 50), ("euler", nfe), ("dpmpp-2m", nfe), ("unipc", nfe)] if flow else \
        [("ddim", 50), ("ddim", nfe), ("ddim-leading", nfe), ("dpmpp-2m", nfe), ("unipc", nfe), ("euler", nfe)]
    reused, source = {}, ""
    if default:
        previous = json.loads((RESULTS / "samplers.json").read_text())
        reused, source = {r["name"]: r for r in previous["rows"]}, "benchmarks/samplers.py " + previous["date"]
    else:  # another NFE's run on this teacher measured its 50-step row (the slowest) on the same noise
        for path in sorted(RESULTS.glob(f"search-*{tag}.json")):
            previous = json.loads(path.read_text())
            done = {r["name"]: r for r in previous["rows"] if "reused" not in r}
            if previous.get("teacher") == args.teacher and teacher_row in done:
                reused = {f"{names[0][0]}-50": done[teacher_row]}
                source = f"{previous['command']} {previous['date']}"
                break
    rows = []
    for solver, n in names:
        name = teacher_row if n == 50 else f"{solver}-{n}"
        if f"{solver}-{n}" in reused:
            r = reused[f"{solver}-{n}"]
            rows.append({"name": name, "sampler": r["sampler"], "nfe": r["nfe"], **fid_fields(r), "reused": source})
        else:
            rows.append(rescore(name, solver, n, stock(solver, teacher)))
    check = None
    if args.check_reuse:
        check = rescore(f"unipc-{nfe} (re-measured)", "unipc", nfe, stock("unipc", teacher))
        rows.append(check)

    # the search, as `dstudio search --nfe N` runs it
    fitness = FIDFitness(teacher, args.num_samples, rungs=[args.screen_samples], promote=3)
    cli = search_args(nfe, args)
    space, _ = search_space(teacher, cli, cli.solver)
    solvers = list(space.solvers)
    cfg = EvolutionConfig(population=args.population, generations=args.generations, top_k=10,
                          mutations=min(25, args.population // 2), crossovers=min(15, args.population // 4), seed=0)
    result, cpu_s, wall_s = run_search(fitness, space, cfg, RESULTS.parent / "runs" / f"search-{nfe}{tag}" /
                                       "search_state.json")
    stats = dict(search_cpu_min=cpu_s / 60, search_wall_min=wall_s / 60, evaluations=result.evaluations,
                 scorings=len(result.history), cache_hit_rate=fitness.cache.hits / max(1, fitness.cache.calls))
    notes = [f"teacher {args.teacher}" + (" (flow matching: searched in its noise fraction s, steps on its grid)"
                                          if flow else ""),
             f"search: population {args.population}, {args.generations} generations, solvers {', '.join(solvers)} "
             f"(part of the candidate), every candidate screened on {args.screen_samples} images (noise seed 1000), "
             f"the 3 best per generation re-scored on {args.num_samples}; one row per solver: its best candidate of "
             f"the one joint search, re-scored on the 2,000-image protocol (noise seed 0) through the exported "
             f"SearchedScheduler in the pipeline",
             f"search cost: {cpu_s / 60:.1f} CPU-minutes ({wall_s / 60:.1f} wall minutes on a shared machine), "
             f"{result.evaluations} candidates, {len(result.history)} scorings, denoiser-cache hit rate "
             f"{stats['cache_hit_rate']:.0%}" + (" (resumed from its finished checkpoint: no cost measured here)"
                                                  if cpu_s < 1 else "")]
    floor = real_floor(protocol.space, protocol.ref, teacher.sample_shape[-1])["fid"]
    out_name = f"search-stage2-{nfe}{tag}" if args.stage2 else f"search-{nfe}{tag}"
    if args.stage2 and args.skip_budget:
        out_name += f"-save{round(100 * args.skip_budget)}"

    def write():
        by = {r["name"]: r for r in rows}
        teacher50, unipc, ddim = by[teacher_row], by[f"unipc-{nfe}"], by[ddim_row]
        for r in rows:
            r["fid_vs_teacher"] = r["fid"] / teacher50["fid"]
            if r["sampler"].startswith("searched"):
                r["fid_vs_unipc"] = r["fid"] / unipc["fid"]
                r["fid_vs_trailing_ddim"] = r["fid"] / ddim["fid"]
        fingerprint = {protocol.space.name: protocol_fingerprint(protocol.space, protocol.ref)}
        write_results(out_name, {"command": command, "teacher": args.teacher, "floor": floor, "rows": rows,
                                 "fingerprint": fingerprint, "best": result.best.to_json(), "notes": notes,
                                 "columns": COLUMNS})

    def searched_row(c, name, sampler, **extra):
        sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=list(c.steps), solver=c.solver)
        return rescore(name, sampler, len(c.steps), sched, steps=str(list(c.steps)), compute_nfe=len(c.steps),
                       **extra), sched

    if args.stage2:
        row, _ = searched_row(result.best, f"searched-{result.best.solver}-{nfe}", f"searched {result.best.solver}",
                              search_fid=result.best_fitness, **stats)
        rows.append(row)
        write()
        stage2(args, teacher, fitness, cfg, result, rows, notes, rescore, searched_row, tag)
    else:
        per_solver = best_per_solver(result.history)
        searched = [(result.best.solver, per_solver[result.best.solver])]  # the search's pick first
        searched += [(s, v) for s, v in sorted(per_solver.items()) if s != result.best.solver]
        for solver, (c, rung, f) in searched:
            best = c.key() == result.best.key()
            row, _ = searched_row(c, f"searched-{solver}-{nfe}", f"searched {solver}", search_fid=f,
                                  search_rung_images=fitness.rungs[rung], best_overall=best, **(stats if best else {}))
            rows.append(row)
            write()
        for name in ("dpmpp-3m", "unipc-3"):
            if name in solvers:  # else it runs the same orders as a stock row above at this NFE
                rows.append(rescore(f"{name}-{nfe}", name, nfe, stock(name, teacher)))
                write()
        if args.baseline_candidates:  # candidates per CPU-minute the old way: DDIM, 500 images, no halving or cache
            old = FIDFitness(teacher, 500, cache_mb=0)
            sample = [Candidate.from_json(h["candidate"]) for h in result.history[:args.baseline_candidates]]
            c0 = time.process_time()
            for c in sample:
                old(Candidate(c.steps))
            old_rate = len(sample) / ((time.process_time() - c0) / 60)
            new_rate = result.evaluations / (cpu_s / 60) if cpu_s else float("nan")
            notes.append(f"throughput: {old_rate:.1f} candidates per CPU-minute before (500 images each, no cache; "
                         f"{len(sample)} candidates timed), {new_rate:.1f} after (successive halving "
                         f"{args.screen_samples} -> {args.num_samples}, cached evaluations and features), "
                         f"{new_rate / old_rate:.1f}x")
        if len(solvers) < len(cli.solver):
            notes.append(f"at {nfe} NFE {', '.join(s for s in cli.solver if s not in solvers)} run the same per-step "
                         f"orders as {', '.join(solvers)} (diffusers lowers the order of the first and last steps), "
                         f"so neither the search nor the stock rows repeat them")
    if check is not None:
        unipc = next(r for r in rows if r["name"] == f"unipc-{nfe}")
        same = abs(check["fid"] - unipc["fid"]) <= 1e-6 * max(1.0, unipc["fid"])
        notes.append(f"re-measured unipc-{nfe}: FID {check['fid']:.6f} against the reused {unipc['fid']:.6f} "
                     f"({'reproduced' if same else 'DIFFERENT'})")
    write()
    print(f"wrote {RESULTS / (out_name + '.json')}", file=sys.stderr)
    return 0


def stage2(args, teacher, fitness, cfg, stage1, rows, notes, rescore, searched_row, tag) -> None:
    """Stage two from stage one's best: skipped blocks under the compute budget, rows through the exported folder."""
    from diffusers import DiffusionPipeline

    nfe = args.nfe
    space, budget = search_space(teacher, search_args(nfe, args, skip_blocks=True), [stage1.best.solver])
    name = f"search-stage2-{nfe}{tag}" + (f"-save{round(100 * args.skip_budget)}" if args.skip_budget else "")
    result, cpu_s, wall_s = run_search(fitness, space, cfg, RESULTS.parent / "runs" / name / "search_state.json",
                                       budget, init=[stage1.best], label="stage two")
    best = result.best
    folder = RESULTS.parent / "runs" / name / "pipeline"
    sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=list(best.steps), solver=best.solver)
    export_skip_pipeline(teacher, best, sched, folder, source=str(args.teacher))
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = fitness.labels[:args.speed_images] if fitness.conditional else None
    speed = pipeline_speedup(folder, labels, fitness.noise[:args.speed_images], "cpu")
    rows.append(rescore(f"stage2-{best.solver}-{len(best.steps)}", f"searched {best.solver}, skipped blocks",
                        len(best.steps), sched, pipeline=pipe, steps=str(list(best.steps)),
                        compute_nfe=space.compute(best), search_fid=result.best_fitness, skipped=best.n_skipped,
                        skip_speedup=speed["speedup"], search_cpu_min=cpu_s / 60, evaluations=result.evaluations))
    row, _ = searched_row(Candidate(best.steps, (), best.solver), f"stage2-steps-unskipped-{len(best.steps)}",
                          f"searched {best.solver}, stage two's steps without skips")
    rows.append(row)
    costs = ", ".join(f"{b} {c:.3f}" for b, c in space.costs.items())
    notes.append(f"stage two: budget {budget.final:.2f} NFE (--nfe {nfe} x (1 - {args.skip_budget})), opened from "
                 f"{nfe} over {min(budget.stages, cfg.generations)} generations, {space.min_steps}..{space.max_steps} "
                 f"steps, solver {stage1.best.solver}; the best executes {space.compute(best):.3f} NFE over "
                 f"{len(best.steps)} steps ({best.n_skipped} skipped block-steps); its exported pipeline folder runs "
                 f"{speed['speedup']:.2f}x as fast with its skips as without (same steps and solver, "
                 f"{speed['images']} images, best of 3); {cpu_s / 60:.1f} CPU-minutes, {result.evaluations} candidates")
    notes.append(f"block costs (share of one full forward's multiply-accumulates that skipping saves): {costs}")


if __name__ == "__main__":
    sys.exit(main())
