"""AutoDiffusion's evolutionary search (Li et al. 2023, Alg. 1): top-k parents, mutation, crossover, random fill."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from dstudio.search.space import Budget, Candidate, SearchSpace


@dataclass
class EvolutionConfig:
    population: int = 50
    generations: int = 10
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 15
    seed: int = 0

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


def _unique(make, seen: set[str], space: SearchSpace, budget: float, tries: int = 100) -> Candidate | None:
    """A candidate from `make()` that fits `budget` and is not in `seen` (then added to it); None after `tries`."""
    for _ in range(tries):
        c = make()
        if c is not None and space.valid(c, budget) and c.key() not in seen:
            seen.add(c.key())
            return c
    return None


def _fill(new: list[Candidate], size: int, space: SearchSpace, budget: float, rng: random.Random,
          seen: set[str]) -> list[Candidate]:
    """`new` topped up with random candidates to `size` (the paper's random part of every population)."""
    while len(new) < size:
        c = _unique(lambda: space.random(rng, budget), seen, space, budget)
        if c is None:
            break
        new.append(c)
    return new


def initial_population(space: SearchSpace, budget: float, rng: random.Random, size: int, seen: set[str],
                       init: list[Candidate] | None = None) -> list[Candidate]:
    """AutoDiffusion's first population: every solver's stock uniform list and the `init` candidates (repaired to
    the budget), mutations of the last `init` (else of the first uniform) up to half, the rest random."""
    new: list[Candidate] = []
    for c in [*space.uniforms(), *(init or [])]:
        c = space.repair(c, rng, budget)
        if c is not None and space.valid(c, budget) and c.key() not in seen:
            seen.add(c.key())
            new.append(c)
    base = new[-1] if init and new else (new[0] if new else space.random(rng, budget))
    while base is not None and len(new) < 1 + size // 2:
        c = _unique(lambda: space.mutate(base, rng, budget), seen, space, budget)
        if c is None:
            break
        new.append(c)
    return _fill(new, size, space, budget, rng, seen)


def breed(space: SearchSpace, budget: float, parents: list[Candidate], rng: random.Random, cfg: EvolutionConfig,
          seen: set[str]) -> list[Candidate]:
    """One generation's new candidates (Li et al. 2023, Alg. 1): `cfg.mutations` mutants and `cfg.crossovers`
    children of the parents, the rest random; every one unseen and within the budget."""
    new: list[Candidate] = []
    for _ in range(cfg.mutations):
        c = _unique(lambda: space.mutate(rng.choice(parents), rng, budget), seen, space, budget)
        if c is not None:
            new.append(c)
    for _ in range(cfg.crossovers):
        c = _unique(lambda: space.crossover(*rng.sample(parents, 2) if len(parents) > 1 else parents * 2, rng, budget),
                    seen, space, budget)
        if c is not None:
            new.append(c)
    return _fill(new, cfg.population, space, budget, rng, seen)


def _rungs(objective) -> int:
    """Fidelity levels of a successive-halving objective (`objective.rungs`, called as objective(c, rung=r)); 1 else."""
    return len(getattr(objective, "rungs", None) or [None])


class Scores:
    """Every scoring so far: per candidate its score at rung 0, 1, ...; ranked by the highest rung reached, then by
    the score there, so parents and the result come from the most reliable scores."""

    def __init__(self, history: list[dict] | None = None):
        self.history: list[dict] = []
        self.scores: dict[str, list[float]] = {}
        self.cands: dict[str, Candidate] = {}
        for h in history or []:
            self.add(h)

    def add(self, h: dict) -> None:
        c = Candidate.from_json(h["candidate"])
        self.cands[c.key()] = c
        self.scores.setdefault(c.key(), []).append(h["fitness"])
        self.history.append(h)

    def rank(self, key: str) -> tuple[int, float]:
        return -len(self.scores[key]), self.scores[key][-1]

    def ranked(self, keys=None) -> list[str]:
        return sorted(self.scores if keys is None else keys, key=self.rank)


def evaluate(objective, candidates: list[Candidate], generation: int, scores: Scores, space: SearchSpace,
             budget: float, promote: int = 3, progress: Callable[[int, int, float], None] | None = None) -> None:
    """Score every new candidate at rung 0, then successive halving (Li et al. 2018, Hyperband's inner loop) when the
    objective has `rungs` (e.g. image counts, cheapest first; called as objective(c, rung=r)): the `promote` best
    at each rung, over the whole history and within the budget, are re-scored at the next."""
    n_rungs = _rungs(objective)

    def score(c: Candidate, rung: int, done: int) -> None:
        t = time.time()
        f = float(objective(c, rung=rung) if n_rungs > 1 else objective(c))
        scores.add({"generation": generation, "candidate": c.to_json(), "fitness": f, "rung": rung,
                    "compute": round(space.compute(c), 6), "seconds": round(time.time() - t, 3)})
        if progress:
            progress(generation, done, scores.scores[scores.ranked()[0]][-1])

    for i, c in enumerate(candidates):
        score(c, 0, i + 1)
    for rung in range(1, n_rungs):
        below = sorted((k for k, v in scores.scores.items() if len(v) >= rung and space.valid(scores.cands[k], budget)),
                       key=lambda k: scores.scores[k][rung - 1])
        for k in below[:promote]:
            if len(scores.scores[k]) == rung:
                score(scores.cands[k], rung, len(candidates))


def evolve(objective: Callable[[Candidate], float], space: SearchSpace, config: EvolutionConfig | None = None,
           budget: Budget | float | None = None, checkpoint: str | Path | None = None, resume: bool = False,
           init: list[Candidate] | None = None, progress: Callable[[int, int, float], None] | None = None,
           write: bool = True) -> SearchResult:
    """Minimise `objective` over `space` within the compute `budget` (a `Budget`, a number of full forwards, or
    None: `space.nfe`). Never evaluates a candidate twice at one fidelity; with `checkpoint` saves every generation
    atomically and `resume=True` continues after the last complete one.

    Processes that share one objective (its samples split across them) run this same deterministic loop;
    all read a checkpoint to resume, only the one with `write=True` saves it.
    """
    from dstudio.distill.core.io import drop_stale_temps, save_json
    from dstudio.distill.core.signals import Stopped, stop_requested

    cfg = config or EvolutionConfig()
    cfg.validate()
    budget = budget if isinstance(budget, Budget) else Budget(float(space.nfe if budget is None else budget))
    budget = replace(budget, stages=min(budget.stages, cfg.generations))  # fully open by the last generation
    rng = random.Random(cfg.seed)
    promote = max(1, int(getattr(objective, "promote", 3)))
    scores, best_per_gen = Scores(), []
    start_gen, t0, spent = 0, time.time(), 0.0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and write:
        drop_stale_temps(ckpt)
    if resume and ckpt and ckpt.is_file():
        state = json.loads(ckpt.read_text())
        scores = Scores(state["history"])
        best_per_gen, start_gen, spent = state["best_per_generation"], state["generation"], state["seconds"]
        rng.setstate(_rng_from_json(state["rng"]))

    for gen in range(start_gen, cfg.generations):
        now = budget.at(gen)
        seen = set(scores.scores)
        if not scores.scores:
            new = initial_population(space, now, rng, cfg.population, seen, init)
        else:
            parents = [scores.cands[k] for k in scores.ranked()[:cfg.top_k]]
            new = breed(space, now, parents, rng, cfg, seen)
        evaluate(objective, new, gen, scores, space, now, promote, progress)
        best_per_gen.append(scores.scores[scores.ranked()[0]][-1])
        if ckpt and write:
            save_json({"generation": gen + 1, "history": scores.history, "best_per_generation": best_per_gen,
                       "seconds": spent + time.time() - t0, "rng": _rng_to_json(rng.getstate())}, ckpt)
        if ckpt and (signum := stop_requested()):  # SIGTERM/SIGINT/SIGUSR1: stop with this generation saved
            raise Stopped(f"stopped after generation {gen + 1}; rerun with --resume", signum)

    # only candidates within the final (fully opened) budget can be the result
    final = [k for k in scores.scores if space.valid(scores.cands[k], budget.final)] or list(scores.scores)
    best_key = scores.ranked(final)[0]
    best = scores.cands[best_key]
    return SearchResult(best, scores.scores[best_key][-1], scores.history, best_per_gen, spent + time.time() - t0,
                        evaluations=len(scores.scores),
                        extra={"best_rung": len(scores.scores[best_key]) - 1, "scorings": len(scores.history),
                               "compute_nfe": space.compute(best), "budget_nfe": budget.final})


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
