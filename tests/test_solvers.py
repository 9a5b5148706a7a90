"""Multistep solvers over arbitrary step lists: equal to diffusers' stock schedulers run at the same time steps,
and their convergence order on a Gaussian, where the probability-flow ODE has a closed form."""
import math

import pytest
import torch

from dstudio.samplers import SearchedScheduler, append_zero, scheduler_from_teacher
from dstudio.samplers.samplers import SOLVERS, get_sampler, sample_solver

STEPS = [[999, 700, 415, 180, 33], [950, 871, 640, 500, 377, 250, 120, 40, 7]]


def run_loop(unet, scheduler, z, labels):
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def pure(teacher, solver, steps, z, labels, denoiser=None):
    sigmas = append_zero(teacher.denoiser.t_to_sigma(torch.tensor(steps)))
    x = z.double() * (1 + sigmas[0] ** 2).sqrt()
    with torch.no_grad():
        return get_sampler(solver)(denoiser or teacher.denoiser, x, sigmas, labels).float()


def data():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 6, 8])


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_equals_diffusers_with_custom_timesteps(teacher, steps, order):
    from diffusers import DPMSolverMultistepScheduler

    stock = DPMSolverMultistepScheduler.from_config(teacher.scheduler.config, algorithm_type="dpmsolver++",
                                                     solver_order=order)
    stock.set_timesteps(timesteps=steps)
    z, labels = data()
    with torch.no_grad():
        ref = run_loop(teacher.unet, stock, z, labels)
    torch.testing.assert_close(pure(teacher, f"dpmpp-{order}m", steps, z, labels), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_equals_diffusers_at_the_same_timesteps(teacher, steps, order):
    """Stock UniPC takes no `timesteps=` for DDPM models: its list and sigmas are set as its set_timesteps would."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    stock = UniPCMultistepScheduler.from_config(teacher.scheduler.config, solver_order=order, solver_type="bh2")
    stock.set_timesteps(len(steps))
    all_sigmas = ((1 - stock.alphas_cumprod) / stock.alphas_cumprod) ** 0.5
    stock.timesteps = torch.tensor(steps)
    stock.sigmas = torch.from_numpy(np.append(all_sigmas.numpy()[steps], 0.0).astype(np.float32))
    z, labels = data()
    with torch.no_grad():
        ref = run_loop(teacher.unet, stock, z, labels)
    torch.testing.assert_close(pure(teacher, f"unipc-{order}", steps, z, labels), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_searched_scheduler_runs_every_solver_as_the_pure_sampler(teacher, solver):
    steps = STEPS[1]
    sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=steps, solver=solver)
    sched.set_timesteps()
    z, labels = data()
    with torch.no_grad():
        via_scheduler = run_loop(teacher.unet, sched, z, labels)
    torch.testing.assert_close(via_scheduler, pure(teacher, solver, steps, z, labels), rtol=1e-4, atol=1e-4)


def gaussian_error(solver: str, n: int, s: float = 0.5, sigma_max: float = 20.0, sigma_min: float = 0.05) -> float:
    """Data N(0, s^2): D(x, sigma) = s^2 / (s^2 + sigma^2) x and the ODE solution is
    x(sigma) = x(sigma_max) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)); error at sigma_min after n steps
    uniform in log sigma."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max
    sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n + 1, dtype=torch.float64)
    out = sample_solver(lambda x, sigma, cond: s**2 / (s**2 + float(sigma) ** 2) * x, x, sigmas, solver=solver)
    exact = x * math.sqrt((s**2 + sigma_min**2) / (s**2 + sigma_max**2))
    return float((out - exact).abs().max())


def test_convergence_orders_on_a_gaussian():
    """Doubling the steps divides the error by 2^order: DDIM 1st order, DPM-Solver++ 2M 2nd order; the higher-order
    solvers are more accurate than 2M at the same steps."""
    def order(solver):
        return math.log2(gaussian_error(solver, 32) / gaussian_error(solver, 64))

    assert 0.8 < order("ddim") < 1.2
    assert 1.7 < order("dpmpp-2m") < 2.3
    for better in ("dpmpp-3m", "unipc-2", "unipc-3"):
        assert gaussian_error(better, 64) < gaussian_error("dpmpp-2m", 64) / 2


def test_solvers_with_the_same_orders_at_n_steps_are_searched_once():
    """diffusers lowers the first and last orders: at 4 steps 3M runs 2M's orders 1, 2, 2, 1 and UniPC-3 UniPC-2's."""
    from dstudio.samplers.samplers import distinct_solvers, solver_orders

    names = ["unipc-2", "unipc-3", "dpmpp-2m", "dpmpp-3m"]
    assert solver_orders(4, 3) == solver_orders(4, 2) == [1, 2, 2, 1]
    assert distinct_solvers(names, 4) == ["unipc-2", "dpmpp-2m"]
    assert distinct_solvers(names, 8) == names


@pytest.mark.parametrize("clip", [dict(clip_sample=True, clip_sample_range=0.3),
                                  dict(thresholding=True, dynamic_thresholding_ratio=0.6, sample_max_value=1.5)])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "unipc-2", "unipc-3"])
def test_searched_scheduler_clips_x0_as_the_search_scores_a_clipping_teacher(teacher, solver, clip):
    """A teacher whose scheduler clips x0 (clip_sample / thresholding) is searched through its clipped denoiser
    (`Teacher.for_sampling`); the exported SearchedScheduler, built from that scheduler, must run the same solve."""
    from diffusers import DDPMScheduler

    from dstudio.distill.core.denoiser import ClippedDenoiser
    from dstudio.samplers.schedules import clipping_of

    clipping_teacher = DDPMScheduler.from_config({**teacher.scheduler.config, **clip})
    steps = STEPS[1]
    sched = scheduler_from_teacher(SearchedScheduler, clipping_teacher, timesteps=steps, solver=solver)
    assert {k: sched.config[k] for k in clip} == clip  # saved with the scheduler: a loaded folder clips too
    sched.set_timesteps()
    z, labels = data()
    clipped = ClippedDenoiser(teacher.denoiser, **clipping_of(clipping_teacher.config))
    with torch.no_grad():
        via_scheduler = run_loop(teacher.unet, sched, z, labels)
    torch.testing.assert_close(via_scheduler, pure(teacher, solver, steps, z, labels, clipped), rtol=1e-4, atol=1e-4)
    assert (via_scheduler - pure(teacher, solver, steps, z, labels)).abs().max() > 1e-2  # the clipping is active


def test_stock_recipe_carries_thresholding_and_refuses_clip_sample(teacher):
    """search.json's stock DPM-Solver++ recipe runs the searched solve on a thresholding teacher (diffusers'
    DPM-Solver++ thresholds x0 as DDIM does); it has no clip_sample, so a clip_sample teacher gets no recipe."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from dstudio.app.search_cli import stock_recipe

    steps = STEPS[1]
    thresholding = DDPMScheduler.from_config({**teacher.scheduler.config, "thresholding": True,
                                              "dynamic_thresholding_ratio": 0.6, "sample_max_value": 1.5})
    recipe = stock_recipe("dpmpp-2m", steps, thresholding.config)
    stock = DPMSolverMultistepScheduler.from_config(thresholding.config, **recipe["config"])
    stock.set_timesteps(**recipe["set_timesteps"])
    ours = scheduler_from_teacher(SearchedScheduler, thresholding, timesteps=steps, solver="dpmpp-2m")
    ours.set_timesteps()
    z, labels = data()
    with torch.no_grad():
        torch.testing.assert_close(run_loop(teacher.unet, stock, z, labels), run_loop(teacher.unet, ours, z, labels),
                                   rtol=1e-4, atol=1e-4)
    clip = DDPMScheduler.from_config({**teacher.scheduler.config, "clip_sample": True})
    assert stock_recipe("dpmpp-2m", steps, clip.config) is None
    assert stock_recipe("dpmpp-2m", steps, teacher.scheduler.config)["config"].get("thresholding") is None
