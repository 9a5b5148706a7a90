"""AutoDiffusion search: the space's operators, the evolution's guarantees, stage two, and the CLI."""
import json
import random

import pytest
import torch

from dstudio.app.cli import main
from dstudio.search import Budget, Candidate, EvolutionConfig, SearchSpace, block_costs, evolve
from dstudio.search.skip import SkippingDenoiser, skippable_blocks, skipping


def test_space_operators_keep_lists_sorted_distinct_and_full():
    space = SearchSpace(1000, 6)
    rng = random.Random(0)
    assert space.uniform().steps == (999, 832, 666, 499, 332, 166)
    for _ in range(200):
        a, b = space.random(rng), space.mutate(space.uniform(), rng)
        for c in (a, b, space.crossover(a, b, rng)):
            assert space.valid(c), c


def test_crossover_repairs_duplicates_instead_of_dropping_steps():
    space = SearchSpace(10, 3)
    a, b = Candidate((9, 5, 1)), Candidate((5, 3, 1))
    for seed in range(50):
        c = space.crossover(a, b, random.Random(seed))
        assert len(set(c.steps)) == 3 and space.valid(c)


def target_distance(target):
    return lambda c: float(sum(abs(x - y) for x, y in zip(c.steps, target)))


def test_evolve_improves_and_never_evaluates_twice():
    space = SearchSpace(100, 4)
    seen = []

    def objective(c):
        seen.append(c.key())
        return target_distance((80, 41, 20, 3))(c)

    cfg = EvolutionConfig(population=20, generations=6, top_k=5, mutations=8, crossovers=4, seed=1)
    result = evolve(objective, space, cfg)
    assert len(seen) == len(set(seen)) == result.evaluations
    assert result.best_per_generation == sorted(result.best_per_generation, reverse=True)
    assert result.best_fitness < objective(space.uniform())


class Interrupted(Exception):
    pass


def test_interrupted_search_resumes_without_reevaluating(tmp_path):
    space = SearchSpace(100, 3)
    cfg = EvolutionConfig(population=10, generations=4, top_k=3, mutations=4, crossovers=2, seed=3)
    calls, interrupted = [], []

    def flaky(c):
        if len(calls) == 25 and not interrupted:
            interrupted.append(True)
            raise Interrupted
        calls.append(c.key())
        return target_distance((70, 30, 5))(c)

    with pytest.raises(Interrupted):
        evolve(flaky, space, cfg, checkpoint=tmp_path / "state.json")
    done = json.loads((tmp_path / "state.json").read_text())
    assert done["generation"] == 2 and len(done["history"]) == 20
    before = list(calls)
    resumed = evolve(flaky, space, cfg, checkpoint=tmp_path / "state.json", resume=True)
    after = calls[len(before):]
    assert not set(after) & {h_key for h_key in (Candidate.from_json(h["candidate"]).key() for h in done["history"])}
    assert resumed.evaluations == len(done["history"]) + len(after)
    uninterrupted = evolve(target_distance((70, 30, 5)), SearchSpace(100, 3), cfg)
    assert resumed.best_fitness == uninterrupted.best_fitness


COSTS = {"a": 0.1, "b": 0.2, "c": 0.05}


def test_budget_is_the_compute_executed_over_all_steps():
    """Hand-computed: each step costs 1 - the share its skipped blocks save; steps may be traded for skips."""
    space = SearchSpace(100, 4, blocks=("a", "b", "c"), costs=COSTS, min_steps=3, max_steps=5)
    c = Candidate((90, 50, 10), (frozenset("ab"), frozenset(), frozenset("c")))
    assert space.compute(c) == pytest.approx(0.7 + 1.0 + 0.95)
    five = Candidate((90, 70, 50, 30, 10), (frozenset("b"),) * 5)  # 5 steps, 20% skipped: 4.0 NFE
    assert space.compute(five) == pytest.approx(4.0) and space.valid(five, 4.0) and not space.valid(five, 3.9)
    lighter = Candidate(five.steps, (frozenset("ac"),) * 5)  # 15% skipped: 4.25 NFE, over a 4-NFE budget
    assert not space.valid(lighter, 4.0) and space.valid(lighter, 4.25)
    assert space.compute(Candidate((9, 5, 1, 0), (frozenset(),) * 4)) == 4.0
    assert SearchSpace(100, 4).compute(Candidate((90, 60, 30, 5))) == 4.0  # stage one: one forward per step
    budget = Budget(3.0, start=4.0, stages=4)
    assert [budget.at(g) for g in range(6)] == pytest.approx([3.75, 3.5, 3.25, 3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="block 'c' has no cost"):
        SearchSpace(100, 4, blocks=("a", "c"), costs={"a": 0.1})


def test_operators_keep_candidates_within_the_budget_and_change_the_step_count():
    space = SearchSpace(100, 4, blocks=("a", "b", "c"), costs=COSTS, min_steps=3, max_steps=6,
                        solvers=("unipc-2", "dpmpp-2m"))
    rng, budget = random.Random(0), 4.0
    pool = [space.repair(space.uniform(), rng, budget)]
    for _ in range(300):
        a, b = rng.choice(pool), rng.choice(pool)
        for c in (space.random(rng, budget), space.mutate(a, rng, budget), space.crossover(a, b, rng, budget)):
            assert c is not None and space.valid(c, budget), c
            assert space.compute(c) <= budget + 1e-9 and len(c.skips) == len(c.steps)
            pool.append(c)
    counts = {len(c.steps) for c in pool}
    assert counts == {3, 4, 5, 6}  # 6 steps fit 4 NFE only by skipping a third of each forward
    assert any(len(c.steps) == 5 and space.compute(c) > 3.5 for c in pool)
    assert space.repair(Candidate((90, 60, 30, 5), (frozenset(),) * 4), rng, 4 * 0.6) is None  # cannot fit


def test_evolve_parts_take_the_budget_and_return_unseen_candidates_within_it():
    from dstudio.search import breed, initial_population

    space = SearchSpace(100, 4, blocks=("a", "b", "c"), costs=COSTS, min_steps=3, max_steps=5)
    rng, seen = random.Random(1), set()
    cfg = EvolutionConfig(population=12, generations=1, top_k=4, mutations=6, crossovers=3)
    first = initial_population(space, 3.5, rng, 12, seen, init=[Candidate((90, 60, 30, 5))])
    assert len(first) == 12 and {c.key() for c in first} == seen
    assert Candidate((90, 60, 30, 5)).steps in {c.steps for c in first}  # the init, repaired to the budget
    children = breed(space, 3.2, first[:4], rng, cfg, seen)
    assert len(children) == 12 and not {c.key() for c in children} & {c.key() for c in first}
    assert all(space.valid(c, b) for b, cs in ((3.5, first), (3.2, children)) for c in cs)
    assert max(space.compute(c) for c in children) <= 3.2 + 1e-9 < max(space.compute(c) for c in first)


def test_stage_two_budget_opens_gradually_and_trades_skips_for_steps():
    """Every candidate of generation g executes at most budget.at(g); the result meets the final budget; the budget
    is passed in, never written into the caller's space; skip sets mutate and candidates take an extra step."""
    space = SearchSpace(100, 4, blocks=("a", "b", "c"), costs=COSTS, min_steps=3, max_steps=5)
    before = dict(vars(space))
    budget = Budget(3.2, start=4.0, stages=3)
    cfg = EvolutionConfig(population=12, generations=6, top_k=4, mutations=6, crossovers=3, seed=0)
    stage1 = Candidate((90, 60, 30, 5))
    result = evolve(target_distance((90, 60, 30, 5)), space, cfg, budget, init=[stage1])
    assert vars(space) == before
    for h in result.history:
        c = Candidate.from_json(h["candidate"])
        assert h["compute"] == pytest.approx(space.compute(c)) and space.compute(c) <= budget.at(h["generation"]) + 1e-9
    # the stage-one result enters repaired to the first generation's budget, 3.2 + 0.8 x 2/3
    assert any(h["candidate"]["steps"] == [90, 60, 30, 5] and 3.6 < h["compute"] <= 3.2 + 0.8 * 2 / 3 + 1e-9
               for h in result.history[:3])
    assert space.compute(result.best) <= 3.2 + 1e-9 and result.extra["compute_nfe"] == space.compute(result.best)
    assert result.extra["budget_nfe"] == 3.2
    assert len({tuple(map(tuple, h["candidate"]["skips"])) for h in result.history}) > 20
    assert {len(h["candidate"]["steps"]) for h in result.history} == {3, 4, 5}
    with pytest.raises(ValueError, match="nfe=0 must be in 1..100"):
        SearchSpace(100, 0)
    with pytest.raises(ValueError, match="sum to less than one full forward"):
        SearchSpace(100, 4, blocks=("a", "b"), costs={"a": 0.5, "b": 0.5})


def test_block_costs_count_multiply_accumulates_by_hand():
    """A one-level UNet at 4x4 with 8 channels: every layer's MACs by hand (3x3 conv: 16 pixels x 9 x in x out)."""
    from diffusers import UNet2DModel

    from dstudio.search.cost import module_macs

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    blocks = skippable_blocks(unet)
    assert blocks == ["down_blocks.0.resnets.0", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1",
                      "mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1"]
    conv3 = lambda cin, cout: 16 * 9 * cin * cout  # noqa: E731
    resnet = conv3(8, 8) + 32 * 8 + conv3(8, 8)  # conv1, time embedding projection (32 -> 8), conv2
    up = conv3(16, 8) + 32 * 8 + conv3(8, 8)  # input: 8 channels + the 8-channel skip connection
    shortcut = 16 * 16 * 8  # the 1x1 shortcut 16 -> 8 still runs when the block is skipped
    attention = 4 * 16 * 8 * 8 + 2 * 16 * 16 * 8  # q, k, v, out projections; Q K^T and A V over 16 tokens
    total = conv3(1, 8) + (8 * 32 + 32 * 32) + resnet + (2 * resnet + attention) + 2 * (up + shortcut) + conv3(8, 1)
    run = lambda: unet(torch.zeros(1, 1, 4, 4), 10)  # noqa: E731
    assert sum(module_macs(unet, run).values()) == total
    costs = block_costs(unet, blocks, run)
    assert costs == pytest.approx({"down_blocks.0.resnets.0": resnet / total, "mid_block.resnets.0": resnet / total,
                                   "mid_block.resnets.1": resnet / total, "mid_block.attentions.0": attention / total,
                                   "up_blocks.0.resnets.0": up / total, "up_blocks.0.resnets.1": up / total})


def test_skipping_is_identity_and_restores(tiny_teacher):
    from dstudio.distill.core.teacher import load_teacher

    t = load_teacher(tiny_teacher)
    names = skippable_blocks(t.unet)
    assert "mid_block.resnets.0" in names and not any("downsamplers" in n for n in names)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        full = t.denoiser(x, 3.0, y)
        with skipping(t.unet, names[:2]):
            skipped = t.denoiser(x, 3.0, y)
        again = t.denoiser(x, 3.0, y)
        per_step = SkippingDenoiser(t.denoiser, t.unet, [3.0, 1.0], [names[:2], ()])
        first, second, first_again = per_step(x, 3.0, y), per_step(x, 1.0, y), per_step(x, 3.0, y)
        full_at_1 = t.denoiser(x, 1.0, y)
    assert not torch.allclose(full, skipped) and torch.equal(full, again)
    # the skip set follows the noise level, not the number of calls (issue 16.2: a counter skipped one chunk only)
    assert torch.equal(first, skipped) and torch.equal(second, full_at_1) and torch.equal(first_again, skipped)
    with pytest.raises(ValueError, match="'conv_in' is not a skippable block"):
        with skipping(t.unet, ["conv_in"]):
            pass


@pytest.mark.parametrize("args, message", [
    (["--nfe", "0"], "--nfe 0 must be in 1..1000"),
    (["--nfe", "1001"], "--nfe 1001 must be in 1..1000"),
    (["--skip-blocks", "--skip-budget", "1"], "--skip-budget 1.0 must be in [0, 1)"),
    (["--skip-blocks", "--max-steps", "3"], "--max-steps 3 must be in 4..1000"),
    (["--skip-blocks", "--skip-budget", "0.99"], "below the"),
])
def test_search_cli_bad_input(args, message, tiny_teacher, tmp_path, capsys):
    assert main(["search", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"), *args]) == 2
    assert message in capsys.readouterr().err


def search_cli(teacher, out, *args) -> dict:
    """`dstudio search --top-k 2 ARGS` on a tiny teacher; the search.json it writes."""
    assert main(["search", "--teacher", str(teacher), "--top-k", "2", "--out", str(out), *args]) == 0
    return json.loads((out / "search.json").read_text())


def test_search_cli_writes_a_scheduler_that_plugs_in(tiny_teacher, tmp_path):
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.samplers import SearchedScheduler

    out = tmp_path / "s"
    record = search_cli(tiny_teacher, out, "--nfe", "3", "--num-samples", "40", "--screen-samples", "20",
                        "--population", "4", "--generations", "2")
    assert len(record["history"]) >= record["evaluations"] >= 5 and (out / "search.png").is_file()
    sched = SearchedScheduler.from_pretrained(out / "scheduler")
    assert sched.config.timesteps == record["best"]["steps"] and sched.config.solver == record["best"]["solver"]
    pipe = load_teacher(tiny_teacher).pipeline
    pipe.scheduler = sched
    assert len(pipe(class_labels=[1, 2]).images) == 2


def test_search_and_skipping_on_a_text_to_image_unet(tmp_path):
    """UNet2DConditionModel: transformer and resnet blocks skip, and evolve searches with a caller's own objective."""
    from tiny_sd import tiny_sd_pipeline

    from dstudio.distill.core.teacher import teacher_from_pipeline
    from dstudio.samplers import append_zero, sample_ddim

    t = teacher_from_pipeline(tiny_sd_pipeline(tmp_path))
    blocks = skippable_blocks(t.unet)
    assert any("attentions" in b for b in blocks) and any("resnets" in b for b in blocks)
    cond = t.conditions(["a red cat", "a blue dog"])
    z = torch.randn(2, *t.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sample_ddim(t.denoiser, z * 50, append_zero(t.denoiser.t_to_sigma(torch.tensor([999, 600, 300]))),
                          cond)

    def objective(c):  # distance to a 3-step reference: any caller-defined fitness plugs in the same way
        sigmas = append_zero(t.denoiser.t_to_sigma(torch.tensor(c.steps)))
        with torch.no_grad():
            x = sample_ddim(SkippingDenoiser(t.denoiser, t.unet, sigmas[:-1], c.skips),
                            z * (1 + sigmas[0] ** 2).sqrt(), sigmas, cond)
        return float((x - ref).pow(2).mean())

    costs = block_costs(t.unet, blocks, lambda: t.denoiser(z[:1], 3.0, cond.index(slice(0, 1))))
    assert all(c > 0 for c in costs.values()) and sum(costs.values()) < 1
    space = SearchSpace(t.num_train_timesteps, 2, tuple(blocks), costs, max_steps=3)
    result = evolve(objective, space, EvolutionConfig(population=4, generations=2, top_k=2, mutations=2,
                                                      crossovers=1), budget=1.8)
    assert result.evaluations >= 5 and space.valid(result.best, 1.8)


def test_solver_is_part_of_the_candidate():
    space = SearchSpace(1000, 4, solvers=("unipc-2", "dpmpp-3m"))
    rng = random.Random(0)
    assert [c.solver for c in space.uniforms()] == ["unipc-2", "dpmpp-3m"]
    seen = {space.mutate(space.uniform("unipc-2"), rng).solver for _ in range(50)}
    assert seen == {"unipc-2", "dpmpp-3m"}
    a, b = space.uniform("unipc-2"), space.random(rng)
    assert all(space.valid(space.crossover(a, b, rng)) for _ in range(20))
    c = Candidate((999, 500, 200, 10), (), "dpmpp-3m")
    assert Candidate.from_json(json.loads(json.dumps(c.to_json()))) == c
    assert c.key() != Candidate(c.steps).key() and not space.valid(Candidate(c.steps))
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        SearchSpace(1000, 4, solvers=("rk4",))


class Rungs:
    """A two-fidelity objective: rung 1 is exact, rung 0 adds a deterministic per-candidate error."""

    rungs, promote = [10, 40], 2

    def __init__(self, target):
        self.target, self.calls = target, []

    def __call__(self, c, rung=None):
        self.calls.append((c.key(), rung))
        exact = target_distance(self.target)(c)
        return exact + (0 if rung == 1 else (hash(c.key()) % 7))


def test_successive_halving_rescores_leaders_and_ranks_by_the_highest_rung():
    objective = Rungs((80, 41, 20, 3))
    cfg = EvolutionConfig(population=10, generations=4, top_k=4, mutations=5, crossovers=2, seed=0)
    result = evolve(objective, SearchSpace(100, 4), cfg)
    assert len(objective.calls) == len(set(objective.calls))  # never twice at one rung
    at = {r: {k for k, rr in objective.calls if rr == r} for r in (0, 1)}
    assert at[1] <= at[0] and 1 <= len(at[1]) <= 2 * cfg.generations  # only screened ones move up, promote per gen
    assert result.best.key() in at[1] and result.extra["best_rung"] == 1
    assert result.best_fitness == min(target_distance((80, 41, 20, 3))(Candidate.from_json(h["candidate"]))
                                      for h in result.history if h["rung"] == 1)


def test_fid_fitness_skips_every_chunk_and_caching_changes_nothing(tiny_teacher):
    """Issue 16.2: with more images than one chunk, every chunk is sampled with the candidate's skips."""
    from dstudio.app.search_cli import FIDFitness
    from dstudio.distill.core.teacher import load_teacher

    t = load_teacher(tiny_teacher)
    names = skippable_blocks(t.unet)
    c = Candidate((999, 600, 300), (frozenset(names[:1]), frozenset(), frozenset(names[1:3])), "unipc-2")
    one = FIDFitness(t, 8, batch_size=8, ref="mnist", features="mnist", cache_mb=0)
    chunked = FIDFitness(t, 8, batch_size=4, ref="mnist", features="mnist")
    plain = Candidate(c.steps, (), "unipc-2")
    torch.testing.assert_close(chunked.images(c), one.images(c))
    assert not torch.allclose(chunked.images(c)[4:], one.images(plain)[4:])
    torch.testing.assert_close(chunked.images(c), one.images(c))  # second pass from the cache
    assert chunked.cache.hits > 0


def test_fid_fitness_scores_in_the_pixels_space(tiny_teacher):
    """`dstudio search --features pixels`: the distance of raw pixel statistics to MNIST-5k at the teacher's size."""
    import math

    from dstudio.app.search_cli import FIDFitness
    from dstudio.distill.core.teacher import load_teacher

    fitness = FIDFitness(load_teacher(tiny_teacher), 8, features="pixels", cache_mb=0)
    assert fitness.space.name == fitness.ref.features == "pixels" and fitness.ref.source == "mnist5k@8px"
    assert math.isfinite(fitness(Candidate((999, 500), (), "ddim")))


@pytest.mark.parametrize("teacher_name", ["tiny_teacher", "flow_teacher"])
def test_stage_two_pipeline_folder_applies_the_skips(teacher_name, request, tmp_path):
    """Issue 17.2: the exported folder skips the searched blocks at their steps, drawing what the search sampled
    (a flow teacher's steps are keyed by the model time s T its pipeline sees)."""
    from diffusers import DiffusionPipeline

    from dstudio.app.search_cli import export_skip_pipeline
    from dstudio.distill.core.teacher import load_pipeline, load_teacher
    from dstudio.samplers import SearchedScheduler, append_zero, get_sampler, scheduler_from_teacher

    t = load_teacher(request.getfixturevalue(teacher_name))
    names = skippable_blocks(t.unet)
    c = Candidate((990, 600, 300), (frozenset(names[:2]), frozenset(), frozenset(names[2:3])), "unipc-2")
    sched = scheduler_from_teacher(SearchedScheduler, t.scheduler, timesteps=list(c.steps), solver=c.solver)
    export_skip_pipeline(t, c, sched, tmp_path / "pipeline")
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert sorted(index["skips"]) == (["463", "995"] if teacher_name == "flow_teacher" else ["300", "990"])
    z, labels = torch.randn(3, *t.sample_shape, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 4, 7])
    sigmas = append_zero(t.denoiser.t_to_sigma(torch.tensor(c.steps)).float())
    x = z * t.denoiser.noise_scale(sigmas[0]).float()  # unit noise in the teacher's own state (VP or flow)
    with torch.no_grad():
        searched = get_sampler(c.solver)(SkippingDenoiser(t.denoiser, t.unet, sigmas[:-1], c.skips), x, sigmas,
                                         labels).clamp(-1, 1)
        unskipped = get_sampler(c.solver)(t.denoiser, x, sigmas, labels).clamp(-1, 1)
    for pipe in (DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True),
                 load_pipeline(tmp_path / "pipeline")):
        out = pipe(class_labels=labels, latents=z, output_type="pt").images * 2 - 1
        torch.testing.assert_close(out, searched, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, unskipped, atol=1e-3)


def test_eval_cache_returns_the_stored_output_and_evicts_least_recent():
    from dstudio.search.memo import EvalCache, memoised

    calls = []

    def den(x, sigma, cond=None):
        calls.append(float(sigma))
        return x * float(sigma)

    cache = EvalCache(max_bytes=2 * 4 * 4)  # two outputs of 4 float32
    D = memoised(den, cache, tag=lambda sigma: "skip-a" if sigma > 1 else "")
    x = torch.ones(4)
    assert torch.equal(D(x, 2.0), D(x, 2.0)) and calls == [2.0] and cache.hits == 1
    D(x, 3.0), D(x, 0.5)  # evicts sigma 2
    D(x, 2.0)
    assert calls == [2.0, 3.0, 0.5, 2.0] and cache.bytes <= cache.max_bytes
    assert torch.equal(memoised(den, cache, tag=lambda sigma: "skip-b")(x, 2.0), x * 2) and len(calls) == 5


def test_stage_two_cli_exports_the_skipping_pipeline_and_times_it(tiny_teacher, tmp_path):
    from dstudio.distill.core.teacher import load_teacher

    out = tmp_path / "s2"
    record = search_cli(tiny_teacher, out, "--nfe", "2", "--skip-blocks", "--skip-budget", "0.5", "--num-samples", "20",
                        "--population", "3", "--generations", "1", "--speed-images", "4")
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    best = Candidate.from_json(record["best"])
    assert index["skips"] == {str(t): sorted(s) for t, s in zip(best.steps, best.skips) if s} and best.n_skipped > 0
    # --skip-budget 0.5 of 2 NFE: the result executes at most 1.0 full forward, in 1 to 3 steps, blocks by their MACs
    assert record["budget_nfe"] == 1.0 and record["compute_nfe"] <= 1.0 + 1e-9 and 1 <= len(best.steps) <= 3
    assert set(record["block_costs"]) == set(skippable_blocks(load_teacher(tiny_teacher).unet))
    assert all(h["compute"] <= 2.0 + 1e-9 for h in record["history"])
    speed = record["pipeline_speed"]
    assert speed["images"] == 4 and speed["speedup"] == speed["images_per_s"] / speed["unskipped_images_per_s"] > 0


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    """A tiny flow-matching teacher (shift 2, FlowMatchEulerDiscreteScheduler), as `dstudio teacher train
    --set method.objective=flow_matching` makes one, trained for two steps."""
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8
    from dstudio.distill.methods.ddpm import DDPM, DDPMConfig

    torch.manual_seed(0)
    data = digits8(8)
    cfg = DDPMConfig(data="digits", resolution=8, channels=(8, 16), grid_steps=2, layout="diffusers",
                     objective="flow_matching", flow_shift=2.0)
    trainer = Trainer(DDPM(cfg, data=data), TrainerConfig(steps=2, batch_size=16, sample_every=100, checkpoint_every=100),
                      tmp_path_factory.mktemp("flow"), data=data)
    return trainer.fit()


def _loop(unet, scheduler, z, labels, **set_timesteps):
    scheduler.set_timesteps(**set_timesteps)
    x = z
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(unet(x_in, t, class_labels=labels).sample, t, x).prev_sample
    return x


def test_searched_scheduler_runs_a_flow_teacher_in_its_own_time(flow_teacher):
    """Flow teachers are searched in their noise fraction s in (0, 1]: DDIM over the list is stock
    FlowMatchEulerDiscreteScheduler run with `sigmas=` u_k = (k + 1) / T, and every solver's SearchedScheduler draws
    what the pure sampler draws from the teacher's denoiser."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dstudio.app.search_cli import stock_recipe
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.samplers import SearchedScheduler, append_zero, get_sampler, scheduler_from_teacher

    t = load_teacher(flow_teacher)
    steps = [990, 700, 420, 150, 30]
    z, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 5, 9])
    sigmas = append_zero(t.denoiser.t_to_sigma(torch.tensor(steps)))
    recipe = stock_recipe("ddim", steps, t.scheduler.config)
    assert recipe["class"] == "FlowMatchEulerDiscreteScheduler"
    assert stock_recipe("unipc-2", steps, t.scheduler.config) is None  # diffusers' flow UniPC takes no custom list
    stock = _loop(t.unet, FlowMatchEulerDiscreteScheduler.from_config(t.scheduler.config), z, labels,
                  **recipe["set_timesteps"])
    for solver in ("ddim", "unipc-2", "dpmpp-3m"):
        sched = scheduler_from_teacher(SearchedScheduler, t.scheduler, timesteps=steps, solver=solver)
        assert sched.config.prediction_type == "flow" and sched.config.flow_shift == 2.0
        with torch.no_grad():
            pure = get_sampler(solver)(t.denoiser, z.double() * (1 + sigmas[0]), sigmas, labels).float()
        ours = _loop(t.unet, sched, z, labels)
        torch.testing.assert_close(ours, pure, rtol=1e-4, atol=1e-4)
        if solver == "ddim":
            torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_search_cli_on_a_flow_matching_teacher(flow_teacher, tmp_path):
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.samplers import SearchedScheduler

    out = tmp_path / "s"
    record = search_cli(flow_teacher, out, "--nfe", "3", "--solver", "ddim", "unipc-2", "--num-samples", "20",
                        "--screen-samples", "10", "--population", "4", "--generations", "2")
    sched = SearchedScheduler.from_pretrained(out / "scheduler")
    assert sched.config.timesteps == record["best"]["steps"] and sched.config.prediction_type == "flow"
    pipe = load_teacher(flow_teacher).pipeline
    pipe.scheduler = sched
    assert len(pipe(class_labels=[1, 2], output_type="pt").images) == 2
