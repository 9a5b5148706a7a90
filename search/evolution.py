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


def _rungs(objective) -> int:
    """Fidelity levels of a successive-halving objective (`objective.rungs`, called as objective(c, rung=r)); 1 else."""
    return len(getattr(objective, "rungs", None) or [None])


def evolve(objective: Callable[[Candidate], float], space: SearchSpace, config: EvolutionConfig | None = None,
           checkpoint: str | Path | None = None, resume: bool = False, init: list[Candidate] | None = None,
           progress: Callable[[int, int, float], None] | None = None, write: bool = True) -> SearchResult:
    """Minimise `objective` over `space`. Never evaluates a candidate twice at one fidelity; with `checkpoint` saves
    every generation atomically and `resume=True` continues after the last complete one.

    Successive halving (Li et al. 2018, Hyperband's inner loop) when the objective has `rungs` (e.g. image counts,
    cheapest first): every new candidate is scored at rung 0, and after each generation the `promote` best at each
    rung (over the whole history) are re-scored at the next. Candidates rank by the highest rung they reached, then
    by their score there, so parents and the result come from the most reliable scores.

    Processes that share one objective (its samples split across them) run this same deterministic loop;
    all read a checkpoint to resume, only the one with `write=True` saves it.
    """
    from dstudio.distill.core.io import drop_stale_temps, save_json
    from dstudio.distill.core.signals import Stopped, stop_requested

    cfg = config or EvolutionConfig()
    cfg.validate()
    rng = random.Random(cfg.seed)
    n_rungs, promote = _rungs(objective), max(1, int(getattr(objective, "promote", 3)))
    scores: dict[str, list[float]] = {}  # key -> score at rung 0, 1, ...
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
            cands[c.key()] = c
            scores.setdefault(c.key(), []).append(h["fitness"])
        rng.setstate(_rng_from_json(state["rng"]))
    max_skipped = space.max_skipped

    def rank(k: str) -> tuple[int, float]:
        return -len(scores[k]), scores[k][-1]

    def score(gen: int, c: Candidate, rung: int, done: int) -> None:
        t = time.time()
        f = float(objective(c, rung=rung) if n_rungs > 1 else objective(c))
        cands[c.key()] = c
        scores.setdefault(c.key(), []).append(f)
        history.append({"generation": gen, "candidate": c.to_json(), "fitness": f, "rung": rung,
                        "seconds": round(time.time() - t, 3)})
        if progress:
            progress(gen, done, scores[min(scores, key=rank)][-1])

    for gen in range(start_gen, cfg.generations):
        if space.blocks:  # stage two: the skip budget opens gradually
            space.budget_now = min(max_skipped, -(-max_skipped * (gen + 1) // cfg.budget_steps))
        seen = set(scores)
        new: list[Candidate] = []
        if not scores:
            first = [space.fit(c, rng) for c in [*space.uniforms(), *(init or [])]]
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
            ranked = sorted(scores, key=rank)
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
            score(gen, c, 0, i + 1)
        for rung in range(1, n_rungs):  # successive halving: the best `promote` of the rung below move up
            below = sorted((k for k in scores if len(scores[k]) >= rung and space.valid(cands[k])),
                           key=lambda k: scores[k][rung - 1])
            for k in below[:promote]:
                if len(scores[k]) == rung:
                    score(gen, cands[k], rung, len(new))
        best_per_gen.append(scores[min(scores, key=rank)][-1])
        if ckpt and write:
            save_json({"generation": gen + 1, "history": history, "best_per_generation": best_per_gen,
                       "seconds": spent + time.time() - t0, "rng": _rng_to_json(rng.getstate())}, ckpt)
        if ckpt and (signum := stop_requested()):  # SIGTERM/SIGINT/SIGUSR1: stop with this generation saved
            raise Stopped(f"stopped after generation {gen + 1}; rerun with --resume", signum)

    # stage two: only candidates that meet the final (fully opened) budget can be the result
    final = [k for k in scores if space.valid(cands[k])] or list(scores)
    best_key = min(final, key=rank)
    return SearchResult(cands[best_key], scores[best_key][-1], history, best_per_gen, spent + time.time() - t0,
                        evaluations=len(scores), extra={"best_rung": len(scores[best_key]) - 1,
                                                        "scorings": len(history)})


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
