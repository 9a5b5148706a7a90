"""iCT / consistency distillation: curriculum, index distribution, boundary scalings, loss, resume, export."""
import math

import pytest
import torch

from dstudio.distill.core.method import Batch, RunContext
from dstudio.distill.methods.consistency import discretisation_steps, index_probabilities
from dstudio.samplers import karras_sigmas
from dstudio.samplers.schedules import consistency_scalings
from fit import fit_digits, stopped_and_resumed


@pytest.mark.parametrize("total, k, n", [
    (800, 0, 11), (800, 99, 11), (800, 100, 21), (800, 250, 41), (800, 699, 641), (800, 700, 1281), (800, 10**6, 1281),
    (1000, 124, 11), (1000, 125, 21), (1000, 375, 81), (1000, 999, 1281),  # K' = floor(K / 8): 100 and 125
    (64, 7, 11), (64, 8, 21),
])
def test_curriculum_matches_hand_computed_values(total, k, n):
    assert discretisation_steps(k, total, 10, 1280) == n


def test_index_distribution_sums_to_one_and_peaks_near_the_lognormal_mode():
    sigmas = karras_sigmas(1281, 0.002, 80.0).flip(0)  # ascending
    p = index_probabilities(sigmas, -1.1, 2.0)
    assert len(p) == 1280 and p.min() >= 0
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    peak = int(p.argmax())
    assert math.exp(-1.1 - 2.0) < sigmas[peak] < math.exp(-1.1 + 2.0)  # within one std of ln sigma's mean
    assert (p[:peak].diff() >= -1e-15).all() and (p[peak:].diff() <= 1e-15).all()  # unimodal
    # the mass of an interval is the lognormal's: P(sigma in [s_a, s_b]) = Phi(...) - Phi(...)
    a, b = 100, 900
    ln = lambda s: (math.log(s) + 1.1) / 2.0  # noqa: E731
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    total = phi(ln(80.0)) - phi(ln(0.002))
    assert p[a:b].sum().item() == pytest.approx((phi(ln(sigmas[b])) - phi(ln(sigmas[a]))) / total, rel=1e-9)


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_boundary_condition(sd):
    c_skip, c_out, _ = consistency_scalings(torch.tensor(0.002, dtype=torch.float64), sd, 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out, c_in = consistency_scalings(torch.tensor(80.0, dtype=torch.float64), sd, 0.002)
    assert c_skip.item() < 1e-3 and abs(c_out.item()) == pytest.approx(sd, rel=1e-3)


@pytest.fixture()
def method(tiny_teacher):
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.methods.consistency import Consistency, ConsistencyConfig

    torch.manual_seed(0)
    return Consistency(ConsistencyConfig(data="digits"), teacher=load_teacher(tiny_teacher))


def test_huber_constant_and_loss_on_fixed_tensors(method, tmp_path):
    assert method.c == pytest.approx(0.00054 * math.sqrt(1 * 8 * 8))
    for p in method.student.model.parameters():  # F = 0: f(x, sigma) = c_skip(sigma) x, so the loss is known
        p.data.zero_()
    x0, labels = torch.randn(5, 1, 8, 8), torch.arange(5)
    with pytest.raises(RuntimeError, match="step budget"):  # the curriculum's K comes from the run, given explicitly
        method.consistency_loss(Batch.of(x0, labels), step=10)
    method.bind(RunContext(tmp_path, steps=80))
    torch.manual_seed(3)
    loss, logs = method.consistency_loss(Batch.of(x0, labels), step=10)  # K' = 10: N = 21
    assert logs["N"] == 21
    torch.manual_seed(3)
    grid = karras_sigmas(21, 0.002, 80.0).flip(0)
    i = torch.multinomial(index_probabilities(grid), 5, replacement=True)
    noise = torch.randn_like(x0)
    s, s_next = grid[i].view(-1, 1, 1, 1), grid[i + 1].view(-1, 1, 1, 1)
    skip = lambda sig: 0.25 / ((sig - 0.002) ** 2 + 0.25)  # noqa: E731  (sigma_data 0.5)
    pred, target = skip(s_next) * (x0 + s_next * noise), skip(s) * (x0 + s * noise)
    d = ((pred - target).pow(2).flatten(1).sum(1) + method.c**2).sqrt() - method.c
    expected = (d / (grid[i + 1] - grid[i])).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_consistency_distillation_target_is_one_teacher_ode_step(tiny_teacher, solver):
    """CD's target: one Heun step (the CM paper's; Euler as an option) of dx/dsigma = (x - D(x)) / sigma, from the
    teacher's weights by default."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.methods.consistency import Consistency, ConsistencyConfig

    teacher = load_teacher(tiny_teacher)
    m = Consistency(ConsistencyConfig(data="digits", target="teacher", solver=solver), teacher=teacher)
    assert m.config.init == "teacher" and ConsistencyConfig(data="digits").init == "scratch"
    x_next, labels = torch.randn(3, 1, 8, 8), torch.arange(3)
    s_next, s = torch.full((3,), 2.0, dtype=torch.float64), torch.full((3,), 1.5, dtype=torch.float64)
    D = lambda x, sig: teacher.denoiser(x, sig, labels)  # noqa: E731
    with torch.no_grad():
        got = m.target_point(x_next, s_next, s, None, None, labels)
        d = (x_next - D(x_next, s_next)) / 2.0
        euler = x_next + (1.5 - 2.0) * d
        want = euler if solver == "euler" else x_next + (1.5 - 2.0) * (d + (euler - D(euler, s)) / 1.5) / 2
    torch.testing.assert_close(got, want)


def _run(tiny_teacher, run, steps, resume=False, **method):
    from dstudio.distill.core.config import from_dict
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.methods.consistency import Consistency, ConsistencyConfig

    torch.manual_seed(0)
    m = Consistency(from_dict(ConsistencyConfig, {"data": "digits", **method}), teacher=load_teacher(tiny_teacher))
    return fit_digits(m, run, steps, resume)


@pytest.mark.parametrize("init", ["scratch", "teacher"])
def test_resume_and_export(tiny_teacher, tmp_path, init):
    from diffusers import DiffusionPipeline

    trainer, pipeline = _run(tiny_teacher, tmp_path / "a", 4, init=init)
    resumed = stopped_and_resumed(lambda *a, **k: _run(tiny_teacher, *a, init=init, **k), tmp_path / "b")
    for a, b in zip(trainer.method.student.parameters(), resumed.method.student.parameters()):
        torch.testing.assert_close(a, b)

    pipe = DiffusionPipeline.from_pretrained(pipeline, trust_remote_code=True)
    # from scratch iCT's boundary scalings; from the teacher its own denoiser, in its parameterisation
    assert pipe.scheduler.config.prediction_type == ("consistency" if init == "scratch" else "v_prediction")
    m, labels = trainer.method, torch.arange(4)
    noise = torch.randn(4, *m.shape, generator=torch.Generator().manual_seed(0))
    out = pipe(class_labels=labels, latents=noise, output_type="pt").images * 2 - 1  # one step by default
    m.eval()  # as Trainer.sample_grid: no dropout when sampling
    with trainer.ema.applied(m.student_net()), torch.no_grad():
        ref = m.sample(labels, torch.Generator().manual_seed(0), steps=1)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)
    pipe.set_progress_bar_config(disable=False)
    two = pipe(class_labels=labels, latents=noise, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(1)).images
    assert pipe.scheduler.timesteps.tolist() == m.export_timesteps(2) and two.shape == out.shape


def test_init_teacher_keeps_the_boundary_within_sigma_min(tiny_teacher):
    """Easy consistency tuning (ECT): f is the teacher's own denoiser, whose f(x, sigma_min) is x up to sigma_min eps;
    its grid stays inside the teacher's levels."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.methods.consistency import Consistency, ConsistencyConfig

    teacher = load_teacher(tiny_teacher)
    m = Consistency(ConsistencyConfig(data="digits", init="teacher"), teacher=teacher)
    lo, hi = m.sigma_range
    assert lo == max(0.002, teacher.denoiser.sigma_min) and hi == min(80.0, teacher.denoiser.sigma_max)
    x, labels = torch.randn(3, 1, 8, 8), torch.arange(3)
    with torch.no_grad():
        assert (m.student(x, torch.tensor(lo), labels) - x).abs().max() < 10 * lo * x.abs().max()


def test_dropout_defaults_and_the_same_mask_in_both_branches(tiny_teacher, tmp_path):
    """iCT, sec. 3.1: dropout 0.3 from scratch (CIFAR-10), and the online and stop-gradient branches share the
    dropout RNG state, so with a fixed seed they drop the same units; the teacher-initialised student keeps 0."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.methods.consistency import Consistency, ConsistencyConfig

    teacher = load_teacher(tiny_teacher)
    assert Consistency(ConsistencyConfig(data="digits", init="teacher"), teacher=teacher).student.model.config.dropout == 0
    m = Consistency(ConsistencyConfig(data="digits"), teacher=teacher)
    drops = [d for name, d in m.student.model.named_modules() if ".resnets." in name and isinstance(d, torch.nn.Dropout)]
    assert drops and all(d.p == 0.3 for d in drops) and m.student.model.training
    masks = []
    for d in drops:
        d.register_forward_hook(lambda mod, args, out: masks.append((out == 0) & (args[0] != 0)))
    m.bind(RunContext(tmp_path, steps=80))
    torch.manual_seed(0)
    m.consistency_loss(Batch.of(torch.randn(6, 1, 8, 8), torch.arange(6)), step=10)
    target, online = masks[:len(drops)], masks[len(drops):]
    assert len(online) == len(drops) and any(t.any() for t in target)  # units were dropped
    for a, b in zip(target, online):
        assert torch.equal(a, b)
    # with the teacher's weights and dropout asked for, the weights are kept
    kept = Consistency(ConsistencyConfig(data="digits", init="teacher", dropout=0.1), teacher=teacher)
    for a, b in zip(kept.student.model.parameters(), teacher.unet.parameters()):
        torch.testing.assert_close(a, b)
