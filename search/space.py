"""AutoDiffusion's search space (Li et al. 2023): sorted, distinct time-step lists, plus per-step sets of skipped blocks."""
from __future__ import annotations

from dataclasses import dataclass, field
from random import Random


@dataclass(frozen=True)
class Candidate:
    """`steps` strictly decreasing; `skips[i]` the blocks replaced by identity at step i (stage two); `solver` a name
    of `samplers.SOLVERS` (the update rule run over the steps)."""

    steps: tuple[int, ...]
    skips: tuple[frozenset[str], ...] = ()
    solver: str = "ddim"

    def key(self) -> str:
        key = ",".join(map(str, self.steps))
        if any(self.skips):
            key += "|" + ";".join("+".join(sorted(s)) for s in self.skips)
        return key if self.solver == "ddim" else f"{self.solver}:{key}"

    @property
    def n_skipped(self) -> int:
        return sum(len(s) for s in self.skips)

    def to_json(self) -> dict:
        return {"steps": list(self.steps), "skips": [sorted(s) for s in self.skips], "solver": self.solver}

    @classmethod
    def from_json(cls, d: dict) -> "Candidate":
        return cls(tuple(d["steps"]), tuple(frozenset(s) for s in d.get("skips", [])), d.get("solver", "ddim"))


@dataclass
class SearchSpace:
    """Time-step lists of `nfe` distinct steps from range(num_train_timesteps); optional skippable blocks."""

    num_train_timesteps: int
    nfe: int
    blocks: tuple[str, ...] = ()
    # The compute budget, as in AutoDiffusion: executed blocks over all steps <= total - max_skipped, i.e. a
    # candidate skips exactly `budget_now` block-steps; evolve raises budget_now to max_skipped by stages.
    max_skipped: int = 0
    mutation_p: float = 0.25
    solvers: tuple[str, ...] = ("ddim",)  # the solver is part of the candidate: mutated and crossed like a step
    budget_now: int = field(default=0, init=False)

    def __post_init__(self):
        from dstudio.samplers.samplers import parse_solver

        if not self.solvers:
            raise ValueError("solvers is empty: give at least one solver")
        for name in self.solvers:
            parse_solver(name)
        if not 1 <= self.nfe <= self.num_train_timesteps:
            raise ValueError(f"nfe={self.nfe} must be in 1..{self.num_train_timesteps} (the teacher's training steps)")
        if self.max_skipped < 0:
            raise ValueError(f"max_skipped={self.max_skipped} must be >= 0")
        if self.max_skipped and not self.blocks:
            raise ValueError("a skip budget was given but the model has no skippable blocks")
        if self.max_skipped > self.nfe * len(self.blocks):
            raise ValueError(f"max_skipped={self.max_skipped} exceeds the {self.nfe} x {len(self.blocks)} block-steps")
        self.budget_now = self.max_skipped

    # --- stage one: time steps -------------------------------------------------------------------
    def uniform(self, solver: str | None = None) -> Candidate:
        """The trailing uniform list, first step at T-1 ([999, 749, 499, 249] for 4 of 1000): the stock schedule."""
        from dstudio.samplers import discrete_timesteps

        steps = tuple(discrete_timesteps(self.num_train_timesteps, self.nfe, "trailing"))
        return self._with_empty_skips(steps, solver or self.solvers[0])

    def uniforms(self) -> list[Candidate]:
        """The stock schedule of every solver: the search starts from what a user gets without it."""
        return [self.uniform(s) for s in self.solvers]

    def random(self, rng: Random) -> Candidate:
        steps = tuple(sorted(rng.sample(range(self.num_train_timesteps), self.nfe), reverse=True))
        return self.fit(self._with_empty_skips(steps, rng.choice(self.solvers)), rng)

    def _with_empty_skips(self, steps: tuple[int, ...], solver: str) -> Candidate:
        return Candidate(steps, tuple(frozenset() for _ in steps) if self.blocks else (), solver)

    def fit(self, c: Candidate, rng: Random) -> Candidate:
        """The same steps with skip sets brought to exactly the current budget (stage-one results enter so)."""
        if not self.blocks:
            return c
        skips = list(c.skips) if c.skips else [frozenset() for _ in c.steps]
        return Candidate(c.steps, tuple(self._fit_budget(skips, rng)), c.solver)

    def _repair(self, steps: list[int], rng: Random) -> tuple[int, ...]:
        """Replace duplicates by unused steps so the step count never silently shrinks."""
        seen, out = set(), []
        for s in steps:
            while s in seen:
                s = rng.randrange(self.num_train_timesteps)
            seen.add(s)
            out.append(s)
        return tuple(sorted(out, reverse=True))

    def mutate(self, c: Candidate, rng: Random) -> Candidate:
        """Each position replaced with probability p by an unused step; each skip set toggled with probability p,
        then repaired to the budget (the reference code never mutated skip sets: `==` written for `=`)."""
        used = set(c.steps)
        steps = list(c.steps)
        for i in range(len(steps)):
            if rng.random() < self.mutation_p:
                new = rng.randrange(self.num_train_timesteps)
                while new in used:
                    new = rng.randrange(self.num_train_timesteps)
                used.discard(steps[i])
                used.add(new)
                steps[i] = new
        order = sorted(range(len(steps)), key=lambda i: -steps[i])
        skips = [c.skips[i] for i in order] if c.skips else []
        if self.blocks:
            skips = [self._mutate_skips(s, rng) for s in skips]
            skips = self._fit_budget(skips, rng)
        solver = rng.choice(self.solvers) if len(self.solvers) > 1 and rng.random() < self.mutation_p else c.solver
        return Candidate(tuple(steps[i] for i in order), tuple(skips), solver)

    def _mutate_skips(self, s: frozenset[str], rng: Random) -> frozenset[str]:
        if rng.random() >= self.mutation_p:
            return s
        block = rng.choice(self.blocks)
        return s - {block} if block in s else s | {block}

    def _fit_budget(self, skips: list[frozenset[str]], rng: Random) -> list[frozenset[str]]:
        """Drop or add random skips until exactly `budget_now` block-steps are skipped."""
        skips = list(skips)
        while sum(len(s) for s in skips) > self.budget_now:
            i = rng.choice([i for i, s in enumerate(skips) if s])
            skips[i] = skips[i] - {rng.choice(sorted(skips[i]))}
        while sum(len(s) for s in skips) < self.budget_now:
            i = rng.choice([i for i, s in enumerate(skips) if len(s) < len(self.blocks)])
            skips[i] = skips[i] | {rng.choice([b for b in self.blocks if b not in skips[i]])}
        return skips

    def crossover(self, a: Candidate, b: Candidate, rng: Random) -> Candidate:
        """Uniform crossover position by position, duplicates repaired (the reference code silently dropped them)."""
        pick = [rng.random() < 0.5 for _ in a.steps]
        steps = self._repair([x if p else y for p, x, y in zip(pick, a.steps, b.steps)], rng)
        solver = a.solver if len(self.solvers) == 1 or rng.random() < 0.5 else b.solver
        if not self.blocks:
            return Candidate(steps, (), solver)
        skips = [x if p else y for p, x, y in zip(pick, a.skips, b.skips)]
        return Candidate(steps, tuple(self._fit_budget(skips, rng)), solver)

    def valid(self, c: Candidate) -> bool:
        ok = len(c.steps) == self.nfe and all(0 <= s < self.num_train_timesteps for s in c.steps)
        ok = ok and all(x > y for x, y in zip(c.steps, c.steps[1:])) and c.solver in self.solvers
        if self.blocks:
            ok = ok and len(c.skips) == self.nfe and c.n_skipped == self.budget_now
            ok = ok and all(s <= set(self.blocks) for s in c.skips)
        return ok
