"""AutoDiffusion's evolutionary search (Li et al. 2023, Alg. 1): top-k parents, mutation, crossover, random fill."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dstudio.search.space import Candidate, SearchSpace


@dataclass
class EvolutionConfig:
    population: int = 50
    generations: int = 10
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 15
    seed: int = 0
    budget_steps: int = 5  # stage two opens the skip budget by max/5 per generation

    def validate(self) -> None:
        for k in ("population", "generations", "top_k"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 1")
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers > self.population:
            raise ValueError(f"mutations={self.mutations} + crossovers={self.crossovers} must fit in "
                             f"population={self.population}")


@dataclass
class SearchResult:
    best: Candidate
    best_fitness: float
    history: list[dict]  # every evaluated candidate: generation, candidate, fitness, seconds
    best_per_generation: list[float]
    seconds: float
    evaluations: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"best": self.best.to_json(), "best_fitness": self.best_fitness, "seconds": self.seconds,
                "evaluations": self.evaluations, "best_per_generation": self.best_per_generation,
                "history": self.history, **self.extra}


def _unique(make, seen: set[str], space: SearchSpace, tries: int = 100) -> Candidate | None:
    for _ in range(tries):
        c = make()
        if space.valid(c) and c.key() not in seen:
            seen.add(c.key())
            return c
    return None


def evolve(objective: Callable[[Candidate], float], space: SearchSpace, config: EvolutionConfig | None = None,
           checkpoint: str | Path | None = None, resume: bool = False, init: list[Candidate] | None = None,
           progress: Callable[[int, int, float], None] | None = None, write: bool = True) -> SearchResult:
    """Minimise `objective` over `space`. Never evaluates a candidate twice; with `checkpoint` saves every
    generation atomically and `resume=True` continues after the last complete one.

    Processes that share one objective (its samples split across them) run this same deterministic loop;
    all read a checkpoint to resume, only the one with `write=True` saves it.
    """
    from dstudio.distill.core.io import drop_stale_temps, save_json
    from dstudio.distill.core.signals import Stopped, stop_requested

    cfg = config or EvolutionConfig()
    cfg.validate()
    rng = random.Random(cfg.seed)
    fitness: dict[str, float] = {}
    cands: dict[str, Candidate] = {}
    history: list[dict] = []
    best_per_gen: list[float] = []
    start_gen, t0, spent = 0, time.time(), 0.0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and write:
        drop_stale_temps(ckpt)
    if resume and ckpt and ckpt.is_file():
        state = json.loads(ckpt.read_text())
        history, best_per_gen, start_gen, spent = (state["history"], state["best_per_generation"],
                                                   state["generation"], state["seconds"])
        for h in history:
            c = Candidate.from_json(h["candidate"])
            cands[c.key()], fitness[c.key()] = c, h["fitness"]
        rng.setstate(_rng_from_json(state["rng"]))
    max_skipped = space.max_skipped

    for gen in range(start_gen, cfg.generations):
        if space.blocks:  # stage two: the skip budget opens gradually
            space.budget_now = min(max_skipped, -(-max_skipped * (gen + 1) // cfg.budget_steps))
        seen = set(fitness)
        new: list[Candidate] = []
        if not fitness:
            first = [space.fit(c, rng) for c in [space.uniform(), *(init or [])]]
            for c in first:
                if space.valid(c) and c.key() not in seen:
                    seen.add(c.key())
                    new.append(c)
            base = new[-1] if init and new else (new[0] if new else space.fit(space.uniform(), rng))
            while len(new) < 1 + cfg.population // 2:
                c = _unique(lambda: space.mutate(base, rng), seen, space)
                if c is None:
                    break
                new.append(c)
        else:
            ranked = sorted(fitness, key=fitness.get)
            parents = [cands[k] for k in ranked[:cfg.top_k]]
            for _ in range(cfg.mutations):
                c = _unique(lambda: space.mutate(rng.choice(parents), rng), seen, space)
                if c is not None:
                    new.append(c)
            for _ in range(cfg.crossovers):
                c = _unique(lambda: space.crossover(*rng.sample(parents, 2) if len(parents) > 1 else parents * 2, rng),
                            seen, space)
                if c is not None:
                    new.append(c)
        while len(new) < cfg.population:
            c = _unique(lambda: space.random(rng), seen, space)
            if c is None:
                break
            new.append(c)

        for i, c in enumerate(new):
            t = time.time()
            f = float(objective(c))
            fitness[c.key()], cands[c.key()] = f, c
            history.append({"generation": gen, "candidate": c.to_json(), "fitness": f,
                            "seconds": round(time.time() - t, 3)})
            if progress:
                progress(gen, i + 1, min(fitness.values()))
        best_per_gen.append(min(fitness.values()))
        if ckpt and write:
            save_json({"generation": gen + 1, "history": history, "best_per_generation": best_per_gen,
                       "seconds": spent + time.time() - t0, "rng": _rng_to_json(rng.getstate())}, ckpt)
        if ckpt and (signum := stop_requested()):  # SIGTERM/SIGINT/SIGUSR1: stop with this generation saved
            raise Stopped(f"stopped after generation {gen + 1}; rerun with --resume", signum)

    # stage two: only candidates that meet the final (fully opened) budget can be the result
    final = [k for k in fitness if space.valid(cands[k])] or list(fitness)
    best_key = min(final, key=fitness.get)
    return SearchResult(cands[best_key], fitness[best_key], history, best_per_gen, spent + time.time() - t0,
                        evaluations=len(history))


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
