"""`dstudio search`: the CLI side of AutoDiffusion, handing `search.evolve` an FID fitness."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from dstudio.samplers import append_zero, get_sampler

SEARCH_STATE = "search_state.json"
SEARCH_MARKERS = (SEARCH_STATE, "search.json", "scheduler")  # what makes a folder hold a search


class FIDFitness:
    """FID of `n` samples from fixed noise and labels for a candidate schedule; the search caches per candidate.

    The noise comes from seed 1000 + `seed`, never the benchmark protocol's seed 0, so a final re-score on the
    protocol is on fresh noise. `labels`/`noise` override both (the benchmark re-scores through this class).
    With `world` > 1 processes each samples its share of the chunks and the features are gathered, so every
    process gets the same FID (stochastic samplers seed each chunk by its start, so their noise depends on `world`).
    """

    def __init__(self, teacher, sampler: str, n: int, features: str = "mnist", seed: int = 0, guidance: float = 1.0,
                 batch_size: int = 500, labels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 ref: str = "mnist", device="cpu", rank: int = 0, world: int = 1):
        from dstudio.app.fid import feature_space, reference_stats

        if teacher.kind == "text":
            raise ValueError("the FID fitness of `dstudio search` covers pixel-space teachers (class-conditional or "
                             "unconditional); for a text-to-image teacher pass your own objective to search.evolve")
        self.teacher, self.sample_fn = teacher, get_sampler(sampler)
        self.denoiser = teacher.guided(guidance)
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.space = feature_space(features, self.device)
        self.ref = reference_stats(ref, self.space, teacher.sample_shape[-1])
        g = torch.Generator().manual_seed(1000 + seed)
        if labels is None:
            labels = torch.arange(n) % teacher.num_classes if teacher.kind == "class" else torch.zeros(n, dtype=torch.long)
        self.labels, self.conditional = labels, teacher.kind == "class"
        self.noise = torch.randn((len(self.labels), *teacher.sample_shape), generator=g) if noise is None else noise
        self.noise_seed = 1000 + seed
        self.chunk = min(batch_size, -(-len(self.labels) // world))

    def images(self, candidate) -> torch.Tensor:
        """This process's share of the candidate's samples (all of them in a single process)."""
        from dstudio.search.skip import SkippingDenoiser

        sigmas = append_zero(self.teacher.denoiser.t_to_sigma(torch.tensor(candidate.steps)).float()).to(self.device)
        den = SkippingDenoiser(self.denoiser, self.teacher.unet, candidate.skips) if candidate.skips else self.denoiser
        out = []
        for k, i in enumerate(range(0, len(self.labels), self.chunk)):
            if k % self.world != self.rank:
                continue
            z = self.noise[i:i + self.chunk].to(self.device)
            y = self.labels[i:i + self.chunk].to(self.device) if self.conditional else None
            gen = torch.Generator(self.device).manual_seed(self.noise_seed + 1 + i)
            out.append(self.sample_fn(den, z * (1 + sigmas[0] ** 2).sqrt(), sigmas, y, generator=gen))
        return torch.cat(out).clamp(-1, 1) if out else torch.empty(0, *self.teacher.sample_shape)

    def __call__(self, candidate) -> float:
        import numpy as np

        from dstudio.app.fid import Stats, frechet, tensor_features

        with torch.no_grad():
            images = self.images(candidate)
            feats = tensor_features(images, self.space) if len(images) else None
        if self.world > 1:
            from accelerate.utils import gather_object

            feats = np.concatenate([f for f in gather_object([feats]) if f is not None])
        return frechet(Stats.of(feats, self.space.name, "candidate", keep_feats=False), self.ref)


def run_search(args) -> dict | None:
    from tqdm.auto import tqdm

    from dstudio.distill.core.export import provenance, save_scheduler
    from dstudio.distill.core.io import check_writable, save_json
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.samplers import SearchedScheduler, scheduler_from_teacher
    from accelerate import PartialState

    from dstudio.distill.core.trainer import cpu_only
    from dstudio.search import EvolutionConfig, SearchSpace, evolve
    from dstudio.search.skip import skippable_blocks

    from dstudio.distill.core.io import run_folder_lock
    from dstudio.distill.core.signals import stop_signals
    from dstudio.distill.core.trainer import check_run_folder, clear_run

    state = PartialState(cpu=cpu_only())  # under `accelerate launch`, each candidate's samples are split
    out = check_writable(args.out)
    check_run_folder(out, args.resume, getattr(args, "overwrite", False), markers=SEARCH_MARKERS)
    if args.resume and not (out / SEARCH_STATE).is_file():
        raise ValueError(f"--resume: no {SEARCH_STATE} in '{out}'; start without --resume")
    teacher = load_teacher(args.teacher, device=state.device)
    T = teacher.num_train_timesteps
    if not 1 <= args.nfe <= T:
        raise ValueError(f"--nfe {args.nfe} must be in 1..{T} (the teacher's training steps)")
    blocks = tuple(skippable_blocks(teacher.unet)) if args.skip_blocks else ()
    max_skipped = int(args.skip_budget * len(blocks) * args.nfe) if blocks else 0
    if args.skip_blocks and max_skipped < 1:
        raise ValueError(f"--skip-budget {args.skip_budget} allows no skipped block over {args.nfe} steps x "
                         f"{len(blocks)} blocks; use a value in (0, 1]")
    space = SearchSpace(T, args.nfe, blocks, max_skipped)
    cfg = EvolutionConfig(population=args.population, generations=args.generations, top_k=args.top_k,
                          mutations=min(25, args.population // 2), crossovers=min(15, args.population // 4),
                          seed=args.seed)
    fitness = FIDFitness(teacher, args.sampler, args.num_samples, features=args.features, seed=args.seed,
                         ref=args.ref, device=state.device, rank=state.process_index, world=state.num_processes)
    init = []
    if args.init:
        import json

        from dstudio.search.space import Candidate

        init = [Candidate.from_json(json.loads(Path(args.init).read_text())["best"])]
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    bars = {}

    def progress(gen, i, best):
        if gen not in bars:
            for b in bars.values():
                b.close()
            bars[gen] = tqdm(total=cfg.population, desc=f"generation {gen + 1}/{cfg.generations}", file=sys.stderr)
        bars[gen].update(1)
        bars[gen].set_postfix(best_fid=f"{best:.4f}")

    with run_folder_lock(out) if state.is_main_process else contextlib.nullcontext(), stop_signals():
        if getattr(args, "overwrite", False) and state.is_main_process:
            clear_run(out, SEARCH_MARKERS + ("search.png",))
        result = evolve(fitness, space, cfg, checkpoint=out / SEARCH_STATE, resume=args.resume, init=init,
                        progress=progress if state.is_main_process else None, write=state.is_main_process)
    for b in bars.values():
        b.close()
    if not state.is_main_process:
        return None
    sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=list(result.best.steps),
                                   solver="dpmpp" if args.sampler == "dpmpp" else "ddim")
    save_scheduler(sched, out / "scheduler")  # its class travels in the folder: loads without dstudio
    record = provenance(teacher=str(args.teacher), nfe=args.nfe, sampler=args.sampler, num_samples=args.num_samples,
                        features=args.features, reference=fitness.ref.source, noise_seed=fitness.noise_seed,
                        skip_blocks=bool(blocks), blocks=list(blocks),
                        max_skipped=max_skipped, config=vars(cfg), **result.to_json())
    save_json(record, out / "search.json")
    _plot(result.best_per_generation, out / "search.png", args.nfe)
    return record


def _plot(best: list[float], path: Path, nfe: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dstudio.distill.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(best) + 1), best, marker="o")
    ax.set(xlabel="generation", ylabel="best FID-mnist so far", title=f"AutoDiffusion search, {nfe} NFE")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def cmd_search(args) -> None:
    from dstudio.app.cli import UsageError

    t0 = time.time()
    try:
        record = run_search(args)
    except ValueError as e:  # bad --nfe, budgets and teachers are reported by the search and the space
        raise UsageError(str(e)) from None
    if record is None:  # not the main process of a launch
        return
    print(f"best {args.nfe}-NFE schedule {record['best']['steps']} FID-mnist {record['best_fitness']:.4f} "
          f"({record['evaluations']} candidates, {time.time() - t0:.0f} s); wrote {args.out}/scheduler, "
          f"{args.out}/search.json")
