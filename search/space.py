"""AutoDiffusion's search space (Li et al. 2023): sorted, distinct time-step lists, a solver, and per-step sets of
skipped blocks under a compute budget (stage two), where the number of steps may change within the budget."""
from __future__ import annotations

from dataclasses import dataclass, field
from random import Random

EPS = 1e-9  # float slack when comparing executed compute with the budget


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


@dataclass(frozen=True)
class Budget:
    """AutoDiffusion's compute budget: the compute executed over all steps, in full-UNet forwards (1.0 = one NFE),
    opened gradually: generation g allows final + (start - final) (1 - (g + 1) / stages), down to `final` (the
    paper opens the skip budget by a fifth per generation), so the population moves from `start` (a stage-one
    result's step count) to the cheaper network step by step."""

    final: float
    start: float | None = None
    stages: int = 5

    def __post_init__(self):
        if self.final <= 0:
            raise ValueError(f"compute budget {self.final} must be > 0 NFE")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be >= 1")

    def at(self, generation: int) -> float:
        start = self.final if self.start is None else max(self.start, self.final)
        return self.final + (start - self.final) * max(0.0, 1 - (generation + 1) / self.stages)


@dataclass
class SearchSpace:
    """Lists of `nfe` distinct steps from range(num_train_timesteps) (stage one). With `blocks`, each step has a set of
    skipped blocks, `costs[block]` the share of one full forward that skipping it saves (search.cost.block_costs), and
    a candidate takes `min_steps`..`max_steps` steps (default `nfe`): whatever fits the compute budget passed to the
    operators, so a 5-step candidate that skips 20% of each forward fits a 4-NFE budget."""

    num_train_timesteps: int
    nfe: int
    blocks: tuple[str, ...] = ()
    costs: dict[str, float] = field(default_factory=dict)
    min_steps: int | None = None
    max_steps: int | None = None
    mutation_p: float = 0.25
    solvers: tuple[str, ...] = ("ddim",)  # the solver is part of the candidate: mutated and crossed like a step

    def __post_init__(self):
        from dstudio.samplers.samplers import parse_solver

        if not self.solvers:
            raise ValueError("solvers is empty: give at least one solver")
        for name in self.solvers:
            parse_solver(name)
        T = self.num_train_timesteps
        if not 1 <= self.nfe <= T:
            raise ValueError(f"nfe={self.nfe} must be in 1..{T} (the teacher's training steps)")
        self.min_steps = self.nfe if self.min_steps is None else self.min_steps
        self.max_steps = self.nfe if self.max_steps is None else self.max_steps
        if not 1 <= self.min_steps <= self.max_steps <= T:
            raise ValueError(f"steps {self.min_steps}..{self.max_steps} must satisfy 1 <= min <= max <= {T}")
        if self.blocks:
            missing = [b for b in self.blocks if b not in self.costs]
            if missing:
                raise ValueError(f"block '{missing[0]}' has no cost: give costs for every block "
                                 f"(search.cost.block_costs)")
            bad = [b for b in self.blocks if not 0 <= self.costs[b] < 1]
            if bad or sum(self.costs[b] for b in self.blocks) >= 1:
                raise ValueError(f"block costs must be >= 0 and sum to less than one full forward: {self.costs}")

    # --- budget accounting ------------------------------------------------------------------------
    def step_cost(self, skipped) -> float:
        """One forward with the `skipped` blocks replaced by identity, in full forwards."""
        return 1.0 - sum(self.costs[b] for b in skipped)

    def compute(self, c: Candidate) -> float:
        """The compute `c` executes over all its steps, in full forwards (NFE-equivalents)."""
        return sum(self.step_cost(s) for s in c.skips) if c.skips else float(len(c.steps))

    def _budget(self, budget: float | None) -> float:
        return float(self.nfe) if budget is None else float(budget)

    # --- candidates -------------------------------------------------------------------------------
    def uniform(self, solver: str | None = None) -> Candidate:
        """The trailing uniform list, first step at T-1 ([999, 749, 499, 249] for 4 of 1000): the stock schedule."""
        from dstudio.samplers import discrete_timesteps

        steps = tuple(discrete_timesteps(self.num_train_timesteps, self.nfe, "trailing"))
        return self._make(steps, [frozenset()] * len(steps), solver or self.solvers[0])

    def uniforms(self) -> list[Candidate]:
        """The stock schedule of every solver: the search starts from what a user gets without it."""
        return [self.uniform(s) for s in self.solvers]

    def _make(self, steps, skips, solver: str) -> Candidate:
        """A candidate from (unsorted) steps and their skip sets; stage one carries no skip sets."""
        pairs = sorted(zip(steps, skips), key=lambda p: -p[0])
        return Candidate(tuple(t for t, _ in pairs), tuple(s for _, s in pairs) if self.blocks else (), solver)

    def random(self, rng: Random, budget: float | None = None) -> Candidate | None:
        n = self.min_steps if self.min_steps == self.max_steps else rng.randint(self.min_steps, self.max_steps)
        steps = rng.sample(range(self.num_train_timesteps), n)
        return self.repair(self._make(steps, [frozenset()] * n, rng.choice(self.solvers)), rng, budget)

    def repair(self, c: Candidate, rng: Random, budget: float | None = None) -> Candidate | None:
        """`c` with random block-steps skipped until its compute fits `budget` (stage-one results enter stage two so);
        None where even skipping every block at every step does not fit."""
        budget = self._budget(budget)
        if not self.blocks:
            return c if self.compute(c) <= budget + EPS else None
        skips = list(c.skips) if c.skips else [frozenset() for _ in c.steps]
        while sum(self.step_cost(s) for s in skips) > budget + EPS:
            free = [(i, b) for i, s in enumerate(skips) for b in self.blocks if b not in s]
            if not free:
                return None
            i, b = rng.choice(free)
            skips[i] = skips[i] | {b}
        return Candidate(c.steps, tuple(skips), c.solver)

    def _unused(self, used: set[int], rng: Random) -> int:
        new = rng.randrange(self.num_train_timesteps)
        while new in used:
            new = rng.randrange(self.num_train_timesteps)
        return new

    def mutate(self, c: Candidate, rng: Random, budget: float | None = None) -> Candidate | None:
        """Each position replaced with probability p by an unused step; each skip set toggled with probability p (the
        reference code never mutated skip sets: `==` written for `=`); with p a step added or dropped where the step
        range allows; the solver switched with p; then repaired to the budget."""
        used = set(c.steps)
        steps = list(c.steps)
        skips = list(c.skips) if c.skips else [frozenset() for _ in steps]
        for i in range(len(steps)):
            if rng.random() < self.mutation_p:
                new = self._unused(used, rng)
                used.discard(steps[i])
                used.add(new)
                steps[i] = new
        if self.min_steps < self.max_steps and rng.random() < self.mutation_p:
            grow = len(steps) < self.max_steps and (len(steps) == self.min_steps or rng.random() < 0.5)
            if grow:
                steps.append(self._unused(used, rng))
                skips.append(frozenset())
            else:
                i = rng.randrange(len(steps))
                del steps[i], skips[i]
        if self.blocks:
            skips = [self._mutate_skips(s, rng) for s in skips]
        solver = rng.choice(self.solvers) if len(self.solvers) > 1 and rng.random() < self.mutation_p else c.solver
        return self.repair(self._make(steps, skips, solver), rng, budget)

    def _mutate_skips(self, s: frozenset[str], rng: Random) -> frozenset[str]:
        if rng.random() >= self.mutation_p:
            return s
        block = rng.choice(self.blocks)
        return s - {block} if block in s else s | {block}

    def crossover(self, a: Candidate, b: Candidate, rng: Random, budget: float | None = None) -> Candidate | None:
        """Uniform crossover position by position (step and its skip set together), duplicates repaired (the reference
        code silently dropped them); the longer parent's extra positions each kept with probability 1/2."""
        if len(a.steps) < len(b.steps):
            a, b = b, a
        a_skips = list(a.skips) if a.skips else [frozenset()] * len(a.steps)
        b_skips = list(b.skips) if b.skips else [frozenset()] * len(b.steps)
        pick = [rng.random() < 0.5 for _ in a.steps]
        pairs = [(a.steps[i], a_skips[i]) if p else (b.steps[i], b_skips[i]) for i, p in enumerate(pick[:len(b.steps)])]
        pairs += [(a.steps[i], a_skips[i]) for i in range(len(b.steps), len(a.steps)) if pick[i]]
        seen, steps = set(), []
        for t, _ in pairs:  # duplicates -> unused steps, so the step count never silently shrinks
            while t in seen:
                t = rng.randrange(self.num_train_timesteps)
            seen.add(t)
            steps.append(t)
        solver = a.solver if len(self.solvers) == 1 or rng.random() < 0.5 else b.solver
        return self.repair(self._make(steps, [s for _, s in pairs], solver), rng, budget)

    def valid(self, c: Candidate, budget: float | None = None) -> bool:
        """Distinct decreasing steps in range, step count in min..max, a known solver, and (stage two) one subset of
        the blocks per step, executing at most `budget` (default `nfe`) full forwards."""
        ok = self.min_steps <= len(c.steps) <= self.max_steps and c.solver in self.solvers
        ok = ok and all(0 <= s < self.num_train_timesteps for s in c.steps)
        ok = ok and all(x > y for x, y in zip(c.steps, c.steps[1:]))
        if self.blocks:
            ok = ok and len(c.skips) == len(c.steps) and all(s <= set(self.blocks) for s in c.skips)
        elif c.skips:
            return False
        return ok and self.compute(c) <= self._budget(budget) + EPS
