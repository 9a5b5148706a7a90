"""`dstudio search`: the CLI side of AutoDiffusion, handing `search.evolve` an FID fitness."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from dstudio.app.errors import UsageError
from dstudio.samplers import append_zero

SEARCH_STATE = "search_state.json"
SEARCH_MARKERS = (SEARCH_STATE, "search.json", "scheduler")  # what makes a folder hold a search


class FIDFitness:
    """FID of a candidate's samples (its steps, solver and skips) from fixed noise and conditions.

    The noise comes from seed 1000 + `seed`, never the benchmark protocol's seed 0, so a final re-score on the
    protocol is on fresh noise. `labels`/`noise` override both (the benchmark re-scores through this class); for a
    text-to-image teacher `labels` index `prompts` (image i: prompt i mod their count by default). Latent teachers'
    samples are decoded by their family's VAE. `ref`: `mnist`, a .npz, an image folder, or `teacher`: the teacher's
    own `ref_steps`-step images (its stock scheduler, pipeline call) on the same conditions from other noise.
    Successive halving: `rungs` are nested image counts (rung r scores the first rungs[r] images, `evolve` promotes
    the `promote` best of each rung), the features of every chunk a candidate was sampled on are kept, and the
    denoiser's evaluations are memoised on their input, so candidates that share their first steps share them.
    With `world` > 1 processes each samples its share of the chunks and the features are gathered, so every
    process gets the same FID (stochastic samplers seed each chunk by its start, so their noise depends on `world`).
    """

    def __init__(self, teacher, n: int, features: str = "mnist", seed: int = 0, guidance: float = 1.0,
                 batch_size: int = 500, labels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 ref: str = "mnist", device="cpu", rank: int = 0, world: int = 1, rungs: list[int] | None = None,
                 promote: int = 3, cache_mb: int = 256, prompts: list[str] | None = None, ref_steps: int = 50):
        from dstudio.distill.evaluation.draw import condition_ids, condition_inputs
        from dstudio.distill.evaluation.spaces import feature_space
        from dstudio.search.memo import EvalCache

        ids = condition_ids(teacher, n, prompts)  # first: a text teacher without prompts is named at once
        self.teacher, self.guidance = teacher, guidance
        self.denoiser = teacher.for_sampling(guidance)  # clip_sample / thresholding as the teacher's scheduler
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.space = feature_space(features, self.device)
        self.table = teacher.conditions(prompts) if teacher.takes_prompts else None  # rows the labels index
        g = torch.Generator().manual_seed(1000 + seed)
        labels = ids if labels is None else labels
        self.labels, self.conditional = labels, teacher.num_classes > 0
        self.noise = torch.randn((len(self.labels), *teacher.sample_shape), generator=g) if noise is None else noise
        self.noise_seed = 1000 + seed
        n = len(self.labels)
        self.rungs = sorted({min(int(r), n) for r in (rungs or [])} | {n})
        if self.rungs[0] < 2:
            raise ValueError(f"the smallest image count {self.rungs[0]} leaves no covariance: use at least 2 images")
        self.ref = self._reference(ref, condition_inputs(teacher, self.labels, prompts), n, ref_steps, seed)
        self.promote = promote
        self.chunk = min(batch_size, self.rungs[0], -(-n // world))
        self.cache = EvalCache(cache_mb * 2**20)
        self._features: dict[tuple[str, int, int], object] = {}

    def _reference(self, ref: str, condition: dict, n: int, steps: int, seed: int):
        """The reference statistics: `teacher` (its own images, other noise), else stats.reference_stats'."""
        from dstudio.distill.evaluation.draw import REFERENCE_SEED, teacher_reference
        from dstudio.distill.evaluation.stats import reference_stats

        if ref == "mnist" and not self.teacher.family.pixel_space:
            raise ValueError("--ref mnist is the embedded digits of pixel-space teachers; for this latent teacher give "
                             "--ref teacher (its own many-step images, the default) or an image folder")
        if ref != "teacher":
            return reference_stats(ref, self.space, self.teacher.pixel_shape[-1])
        return teacher_reference(self.teacher, self.space, condition, n, steps, REFERENCE_SEED + seed, self.guidance)

    def _cond(self, ids: torch.Tensor):
        """The sampler's condition of a chunk: rows of the prompt table, class labels, or none."""
        if self.table is not None:
            return self.table.index(ids.to(self.device))
        return ids.to(self.device) if self.conditional else None

    def _chunks(self, count: int) -> list[int]:
        """Starts of this process's chunks among the first `count` images."""
        return [i for k, i in enumerate(range(0, count, self.chunk)) if k % self.world == self.rank]

    def _sample(self, candidate, i: int, count: int) -> torch.Tensor:
        from dstudio.samplers import get_sampler
        from dstudio.search.memo import memoised
        from dstudio.search.skip import SkippingDenoiser, skip_at

        sigmas = append_zero(self.teacher.denoiser.t_to_sigma(torch.tensor(candidate.steps)).float()).to(self.device)
        den, tag = self.denoiser, (lambda sigma: "")
        if any(candidate.skips):
            skipper = den = SkippingDenoiser(self.denoiser, self.teacher.unet, sigmas[:-1], candidate.skips)
            tag = lambda sigma: sorted(skip_at(sigma, skipper.sigmas, skipper.skips))  # noqa: E731
        den = memoised(den, self.cache, tag)
        end = min(i + self.chunk, count)
        z = self.noise[i:end].to(self.device)
        y = self._cond(self.labels[i:end])
        gen = torch.Generator(self.device).manual_seed(self.noise_seed + 1 + i)
        x = z * float(self.teacher.denoiser.noise_scale(float(sigmas[0])))  # unit noise in the teacher's state
        x = get_sampler(candidate.solver)(den, x, sigmas, y, generator=gen)
        return self.teacher.decode(x).clamp(-1, 1)  # latent families: through the VAE

    def images(self, candidate, count: int | None = None) -> torch.Tensor:
        """This process's share of the candidate's first `count` samples (all of them in a single process)."""
        count = len(self.labels) if count is None else count
        with torch.no_grad():
            out = [self._sample(candidate, i, count) for i in self._chunks(count)]
        return torch.cat(out) if out else torch.empty(0, *self.teacher.pixel_shape)

    def __call__(self, candidate, rung: int | None = None) -> float:
        import numpy as np

        from dstudio.distill.evaluation.spaces import tensor_features
        from dstudio.distill.evaluation.stats import Stats, frechet

        count = self.rungs[-1 if rung is None else rung]
        feats = []
        for i in self._chunks(count):
            key = (candidate.key(), i, min(i + self.chunk, count))
            if key not in self._features:
                with torch.no_grad():
                    self._features[key] = tensor_features(self._sample(candidate, i, count), self.space)
            feats.append(self._features[key])
        feats = np.concatenate(feats) if feats else None
        if self.world > 1:
            from accelerate.utils import gather_object

            feats = np.concatenate([f for f in gather_object([feats]) if f is not None])
        return frechet(Stats.of(feats, self.space.name, "candidate", keep_feats=False), self.ref)


def run_search(args) -> dict | None:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from dstudio.distill.core.export import provenance, save_scheduler
    from dstudio.distill.core.checkpoint import check_run_folder, clear_run
    from dstudio.distill.core.io import check_writable, run_folder_lock, save_json
    from dstudio.distill.core.method import read_prompts
    from dstudio.distill.core.signals import stop_signals
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.core.trainer import cpu_only
    from dstudio.samplers import SearchedScheduler, scheduler_from_teacher
    from dstudio.search import EvolutionConfig, evolve

    state = PartialState(cpu=cpu_only())  # under `accelerate launch`, each candidate's samples are split
    out = check_writable(args.out)
    check_run_folder(out, args.resume, getattr(args, "overwrite", False), markers=SEARCH_MARKERS)
    if args.resume and not (out / SEARCH_STATE).is_file():
        raise ValueError(f"--resume: no {SEARCH_STATE} in '{out}'; start without --resume")
    init = read_init(args.init) if args.init else []  # before the teacher loads: a bad file fails at once
    prompts = read_prompts(args.prompts) if args.prompts else None
    teacher = load_teacher(args.teacher, device=state.device)
    space, budget = search_space(teacher, args, [*(c.solver for c in init), *args.solver])  # before any sampling
    fitness = FIDFitness(teacher, args.num_samples, seed=args.seed, guidance=args.guidance, device=state.device,
                         rank=state.process_index, world=state.num_processes, rungs=[args.screen_samples],
                         promote=args.promote, prompts=prompts, ref_steps=args.ref_steps,
                         **fitness_defaults(teacher, args))
    cfg = EvolutionConfig(population=args.population, generations=args.generations, top_k=args.top_k,
                          mutations=min(25, args.population // 2), crossovers=min(15, args.population // 4),
                          seed=args.seed)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    # one bar over the generations' screened candidates; tqdm's ETA includes the re-scoring of leaders
    bar = tqdm(total=cfg.population * cfg.generations, desc="search", unit="cand", file=sys.stderr,
               disable=not state.is_main_process)

    def progress(gen, i, best):
        bar.update(gen * cfg.population + i - bar.n)
        bar.set_postfix(gen=f"{gen + 1}/{cfg.generations}", best_fid=f"{best:.4f}")

    cpu0 = time.process_time()
    with bar, run_folder_lock(out) if state.is_main_process else contextlib.nullcontext(), stop_signals():
        if getattr(args, "overwrite", False) and state.is_main_process:
            clear_run(out, SEARCH_MARKERS + ("search.png", "pipeline"))
        result = evolve(fitness, space, cfg, budget, checkpoint=out / SEARCH_STATE, resume=args.resume, init=init,
                        progress=progress if state.is_main_process else None, write=state.is_main_process)
    if state.num_processes > 1:  # the search's collectives are over: a rank that exits with a live group can abort
        state.wait_for_everyone()
        state.destroy_process_group()
    if not state.is_main_process:
        return None
    best = result.best
    sched = scheduler_from_teacher(SearchedScheduler, teacher.family.fixed_scheduler(), timesteps=list(best.steps),
                                   solver=best.solver)  # FLUX's dynamic shift resolved at the searched size
    save_scheduler(sched, out / "scheduler")  # its class travels in the folder: loads without dstudio
    speed = None
    if any(best.skips):
        export_skip_pipeline(teacher, best, sched, out / "pipeline", source=str(args.teacher))
        speed = pipeline_speedup(out / "pipeline", fitness.labels[:args.speed_images] if fitness.conditional else None,
                                 fitness.noise[:args.speed_images], state.device)
    record = provenance(teacher=str(args.teacher), nfe=args.nfe, solvers=list(space.solvers),
                        num_samples=args.num_samples, screen_samples=args.screen_samples, promote=args.promote,
                        features=fitness.space.name, reference=fitness.ref.source, noise_seed=fitness.noise_seed,
                        prompts=args.prompts, guidance=args.guidance, pipeline=type(teacher.pipeline).__name__,
                        skip_blocks=bool(space.blocks), block_costs=space.costs, skip_budget=args.skip_budget,
                        steps_range=[space.min_steps, space.max_steps], config=vars(cfg),
                        cpu_seconds=time.process_time() - cpu0,
                        cache_hit_rate=fitness.cache.hits / max(1, fitness.cache.calls),
                        stock=stock_recipe(best.solver, list(best.steps), teacher.scheduler.config),
                        pipeline_speed=speed, **result.to_json())
    save_json(record, out / "search.json")
    _plot(result.best_per_generation, out / "search.png", args.nfe, fitness.space.name)
    return record


def fitness_defaults(teacher, args) -> dict:
    """--ref and --features, defaulted by the teacher: the embedded MNIST protocol (`mnist`, `mnist`) for a pixel-space
    teacher, else the teacher's own many-step images (`teacher`) in raw `pixels` (offline, any size)."""
    pixel = teacher.family.pixel_space
    return {"ref": args.ref or ("mnist" if pixel else "teacher"),
            "features": args.features or ("mnist" if pixel else "pixels")}


def read_init(path: str) -> list:
    """`--init FILE`: the best candidate of a search.json, as the one seed of the population."""
    import json

    from dstudio.samplers.samplers import SOLVERS
    from dstudio.search.space import Candidate

    what = f"--init '{path}'"
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} cannot be read ({type(e).__name__}): give a search.json written by dstudio "
                         "search") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} is not JSON ({e.msg} at line {e.lineno}): give a search.json written by "
                         "dstudio search") from None
    try:
        best = Candidate.from_json(record["best"])
    except (KeyError, TypeError, ValueError):
        best = None
    if best is None or not best.steps or not all(type(t) is int for t in best.steps) or best.solver not in SOLVERS:
        raise UsageError(f"{what} has no \"best\" candidate (integer \"steps\", a known \"solver\"): give a "
                         "search.json written by dstudio search")
    return [best]


def search_space(teacher, args, solvers) -> tuple:
    """`dstudio search`'s space and compute budget. Stage one: `--nfe` steps, budget `--nfe` full forwards. Stage two
    (`--skip-blocks`): per-step skipped blocks weighted by the compute they save (search.cost.block_costs), a budget of
    `--nfe` x (1 - `--skip-budget`) full forwards opened gradually from `--nfe`, and `--nfe` - 1 .. `--max-steps`
    steps, so skipped blocks can pay for an extra step."""
    from dstudio.samplers.samplers import distinct_solvers
    from dstudio.search import Budget, SearchSpace, block_costs
    from dstudio.search.skip import skippable_blocks

    T, nfe = teacher.num_train_timesteps, args.nfe
    if not 1 <= nfe <= T:
        raise ValueError(f"--nfe {nfe} must be in 1..{T} (the teacher's training steps)")
    if not args.skip_blocks:
        return SearchSpace(T, nfe, solvers=tuple(distinct_solvers(dict.fromkeys(solvers), nfe))), Budget(float(nfe))
    if not 0 <= args.skip_budget < 1:
        raise ValueError(f"--skip-budget {args.skip_budget} must be in [0, 1): the share of --nfe's compute to save")
    max_steps = nfe + 1 if args.max_steps is None else args.max_steps
    if not nfe <= max_steps <= T:
        raise ValueError(f"--max-steps {max_steps} must be in {nfe}..{T} (--nfe up to the teacher's training steps)")
    if not teacher.family.pixel_space:
        raise ValueError(f"--skip-blocks searches the blocks of a pixel-space UNet; this teacher is a "
                         f"{type(teacher.pipeline).__name__} (search its time steps without --skip-blocks)")
    if not hasattr(teacher.network, "down_blocks"):
        raise ValueError(f"--skip-blocks searches a UNet's blocks; this teacher's network is a "
                         f"{type(teacher.network).__name__}")
    blocks = tuple(skippable_blocks(teacher.unet))
    if not blocks:
        raise ValueError("--skip-blocks: this teacher's UNet has no skippable block (resolution-keeping resnets, "
                         "attention)")
    x = torch.zeros(1, *teacher.sample_shape, device=teacher.unet.device)
    cond = teacher.cond(torch.zeros(1, dtype=torch.long, device=x.device))
    costs = block_costs(teacher.unet, blocks, lambda: teacher.denoiser(x, 1.0, cond))
    budget = Budget(nfe * (1 - args.skip_budget), start=float(nfe))
    min_steps = max(1, nfe - 1)
    fastest = min_steps * (1 - sum(costs.values()))
    if fastest > budget.final:
        raise ValueError(f"--skip-budget {args.skip_budget} leaves {budget.final:.2f} NFE, below the {fastest:.2f} "
                         f"of {min_steps} steps with every block skipped")
    solvers = distinct_solvers(dict.fromkeys(solvers), range(min_steps, max_steps + 1))
    return SearchSpace(T, nfe, blocks, costs, min_steps, max_steps, solvers=tuple(solvers)), budget


def skips_by_timestep(candidate, scheduler) -> dict[str, list[str]]:
    """A stage-two candidate's skip sets keyed by the model time step the pipeline sees at each step (rounded, as the
    exported pipeline reads them: the grid index for DDPM teachers, s T for flow-matching ones)."""
    scheduler.set_timesteps(timesteps=list(candidate.steps))
    keys = [str(int(round(float(t)))) for t in scheduler.timesteps]
    if len(set(keys)) < len(keys):
        raise ValueError(f"steps {list(candidate.steps)} give the model the same rounded time twice ({keys}): "
                         f"their skip sets cannot be told apart in the exported pipeline")
    return {k: sorted(s) for k, s in zip(keys, candidate.skips) if s}


def export_skip_pipeline(teacher, candidate, scheduler, path: Path, **info) -> Path:
    """The teacher's UNet with the searched scheduler and per-step skipped blocks, as a pipeline folder that applies
    the skips when run (`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`)."""
    from dstudio.distill.core.export import export_image_pipeline

    return export_image_pipeline(teacher.unet, scheduler, path, skips=skips_by_timestep(candidate, scheduler),
                                 kind="searched schedule with skipped blocks (AutoDiffusion stage two)",
                                 candidate=candidate.to_json(), **info)


def pipeline_speedup(folder: Path, labels: torch.Tensor | None, noise: torch.Tensor, device, repeats: int = 3) -> dict:
    """Images/s of the exported stage-two folder, loaded as plain diffusers loads it, with its skips and with them
    switched off (the same steps and solver), alternated `repeats` times, best of each (timing noise is one-sided)."""
    from diffusers import DiffusionPipeline

    from dstudio.distill.evaluation.protocol import timed

    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    skips = dict(pipe.config.skips)
    seconds = {"skipped": [], "unskipped": []}
    for _ in range(repeats):
        for name, value in (("skipped", skips), ("unskipped", None)):
            pipe.register_to_config(skips=value)
            _, dt = timed(pipe, batch_size=len(noise), class_labels=None if labels is None else labels.to(device),
                          latents=noise.to(device), output_type="pt")
            seconds[name].append(dt)
    rate = {k: len(noise) / min(v) for k, v in seconds.items()}
    return {"images": len(noise), "images_per_s": rate["skipped"], "unskipped_images_per_s": rate["unskipped"],
            "speedup": rate["skipped"] / rate["unskipped"]}


def stock_recipe(solver: str, steps: list[int], teacher_config) -> dict | None:
    """How a stock diffusers scheduler runs a searched list, where one can: DPM-Solver++ takes `timesteps=` in
    set_timesteps (a pipeline that passes them through, e.g. Stable Diffusion's); on a flow-matching teacher DDIM is
    FlowMatchEulerDiscreteScheduler's Euler step at `sigmas=` u_k = (k + 1) / T (it applies its shift to them). DDIM
    and UniPC on DDPM models, and the multistep solvers on flow models, take no custom list in diffusers: those run
    through the exported SearchedScheduler, as does DPM-Solver++ on a teacher with clip_sample (which diffusers'
    DPM-Solver++ lacks; its dynamic thresholding is DDIM's and travels)."""
    from dstudio.samplers.samplers import parse_solver
    from dstudio.samplers.schedules import clipping_of, is_flow_matching

    rule, order = parse_solver(solver)
    if is_flow_matching(teacher_config):
        if order > 1:
            return None
        T = teacher_config["num_train_timesteps"]
        return {"class": "FlowMatchEulerDiscreteScheduler", "config": {},
                "set_timesteps": {"sigmas": [(k + 1) / T for k in steps]}}
    clipping = clipping_of(teacher_config) or {}
    if rule != "dpmpp" or order == 1 or "clip_range" in clipping:
        return None
    config = {"algorithm_type": "dpmsolver++", "solver_order": order, "final_sigmas_type": "zero"}
    if clipping:
        config.update(thresholding=True, dynamic_thresholding_ratio=clipping["threshold_ratio"],
                      sample_max_value=clipping["max_value"])
    return {"class": "DPMSolverMultistepScheduler", "config": config, "set_timesteps": {"timesteps": steps}}


def _plot(best: list[float], path: Path, nfe: int, features: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dstudio.distill.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(best) + 1), best, marker="o")
    ax.set(xlabel="generation", ylabel=f"best FID-{features} so far", title=f"AutoDiffusion search, {nfe} NFE")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def cmd_search(args) -> None:
    t0 = time.time()
    try:
        record = run_search(args)
    except ValueError as e:  # bad --nfe, budgets and teachers are reported by the search and the space
        raise UsageError(str(e)) from None
    if record is None:  # not the main process of a launch
        return
    print(f"best {args.nfe}-NFE schedule {record['best']['steps']} with {record['best']['solver']} "
          f"({record['compute_nfe']:.2f} NFE executed): FID-{record['features']} "
          f"{record['best_fitness']:.4f} on {args.num_samples} images ({record['evaluations']} candidates, "
          f"{time.time() - t0:.0f} s, {record['cpu_seconds'] / 60:.1f} CPU-min); wrote {args.out}/scheduler, "
          f"{args.out}/search.json")
