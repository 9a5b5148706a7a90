"""AutoDiffusion's search space (Li et al. 2023): sorted, distinct time-step lists, plus per-step sets of skipped blocks."""
from __future__ import annotations

from dataclasses import dataclass, field
from random import Random


@dataclass(frozen=True)
class Candidate:
    """`steps` strictly decreasing; `skips[i]` the blocks replaced by identity at step i (stage two)."""

    steps: tuple[int, ...]
    skips: tuple[frozenset[str], ...] = ()

    def key(self) -> str:
        if not any(self.skips):
            return ",".join(map(str, self.steps))
        return ",".join(map(str, self.steps)) + "|" + ";".join("+".join(sorted(s)) for s in self.skips)

    @property
    def n_skipped(self) -> int:
        return sum(len(s) for s in self.skips)

    def to_json(self) -> dict:
        return {"steps": list(self.steps), "skips": [sorted(s) for s in self.skips]}

    @classmethod
    def from_json(cls, d: dict) -> "Candidate":
        return cls(tuple(d["steps"]), tuple(frozenset(s) for s in d.get("skips", [])))


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
    budget_now: int = field(default=0, init=False)

    def __post_init__(self):
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
    def uniform(self) -> Candidate:
        """The trailing uniform list, first step at T-1 ([999, 749, 499, 249] for 4 of 1000)."""
        from dstudio.samplers import discrete_timesteps

        return self._with_empty_skips(tuple(discrete_timesteps(self.num_train_timesteps, self.nfe, "trailing")))

    def random(self, rng: Random) -> Candidate:
        steps = tuple(sorted(rng.sample(range(self.num_train_timesteps), self.nfe), reverse=True))
        return self.fit(self._with_empty_skips(steps), rng)

    def _with_empty_skips(self, steps: tuple[int, ...]) -> Candidate:
        return Candidate(steps, tuple(frozenset() for _ in steps) if self.blocks else ())

    def fit(self, c: Candidate, rng: Random) -> Candidate:
        """The same steps with skip sets brought to exactly the current budget (stage-one results enter so)."""
        if not self.blocks:
            return c
        skips = list(c.skips) if c.skips else [frozenset() for _ in c.steps]
        return Candidate(c.steps, tuple(self._fit_budget(skips, rng)))

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
        return Candidate(tuple(steps[i] for i in order), tuple(skips))

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
        if not self.blocks:
            return Candidate(steps)
        skips = [x if p else y for p, x, y in zip(pick, a.skips, b.skips)]
        return Candidate(steps, tuple(self._fit_budget(skips, rng)))

    def valid(self, c: Candidate) -> bool:
        ok = len(c.steps) == self.nfe and all(0 <= s < self.num_train_timesteps for s in c.steps)
        ok = ok and all(x > y for x, y in zip(c.steps, c.steps[1:]))
        if self.blocks:
            ok = ok and len(c.skips) == self.nfe and c.n_skipped == self.budget_now
            ok = ok and all(s <= set(self.blocks) for s in c.skips)
        return ok
