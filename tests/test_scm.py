"""sCM (Lu & Song 2024): TrigFlow <-> VE, time distribution, tangent and its normalisation, warm-up, adaptive weighting,
JVP against finite differences, a student that starts as its teacher, resume, and the export in plain diffusers."""
import math

import pytest
import torch

from conftest import ZOO
from dstudio.distill.core.config import ConfigError, from_dict
from dstudio.distill.core.method import Batch, RunContext
from dstudio.distill.methods.scm import (SCM, AdaptiveWeight, SCMConfig, normalise_tangent, sample_trigflow_times,
                                         scm_loss, scm_tangent, tangent_warmup, trigflow_sigma, trigflow_time)
from fit import fit_digits, stopped_and_resumed

SD = 0.5


def make(teacher, **cfg):
    torch.manual_seed(0)
    return SCM(from_dict(SCMConfig, {"data": "digits", **cfg}), teacher=teacher)


@pytest.mark.parametrize("t", [0.05, math.pi / 4, 1.1, 1.5])
def test_trigflow_is_the_ve_scale(t):
    """x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2): x_t / cos t = x0 + sigma n with sigma = sd tan t (sd at t = pi/4)."""
    x0, n = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    x_t = math.cos(t) * x0 + math.sin(t) * SD * n
    sigma = trigflow_sigma(torch.tensor(t, dtype=torch.float64), SD)
    torch.testing.assert_close(x_t / math.cos(t), x0 + sigma * n)
    assert float(trigflow_time(sigma, SD)) == pytest.approx(t, abs=1e-12)
    assert float(trigflow_sigma(torch.tensor(math.pi / 4), SD)) == pytest.approx(SD)


def test_training_times_are_lognormal_in_sigma():
    """tan(t) = e^tau / sd with tau ~ N(P_mean, P_std^2): ln(sd tan t) has the paper's mean and std."""
    torch.manual_seed(0)
    t = sample_trigflow_times(200_000, -1.0, 1.4, SD, (1e-9, 1e9))
    tau = trigflow_sigma(t, SD).log()
    assert tau.mean().item() == pytest.approx(-1.0, abs=0.02) and tau.std().item() == pytest.approx(1.4, abs=0.02)
    clamped = sample_trigflow_times(1000, -1.0, 1.4, SD, (0.1, 2.0))
    assert trigflow_sigma(clamped, SD).min() >= 0.1 - 1e-9 and trigflow_sigma(clamped, SD).max() <= 2.0 + 1e-9


def test_tangent_is_cos_t_times_df_dt_and_its_first_term_before_warmup():
    """With F(x, t) = x sin t + t along dx/dt = u (so dF/dt = u sin t + x cos t + 1) and f = cos t x - sd sin t F:
    Algorithm 1's g is cos(t) df/dt at r = 1, and -cos^2 t (sd F - u) at r = 0."""
    torch.manual_seed(0)
    x, u = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.7, 1.2, 1.5], dtype=torch.float64)
    c, s = t.cos().view(-1, 1, 1, 1), t.sin().view(-1, 1, 1, 1)
    F, dF = x * s + t.view(-1, 1, 1, 1), u * s + x * c + 1
    df_dt = -s * x + c * u - SD * (c * F + s * dF)
    torch.testing.assert_close(scm_tangent(F, dF, x, u, t, 1.0, SD), c * df_dt)
    torch.testing.assert_close(scm_tangent(F, dF, x, u, t, 0.0, SD), -c**2 * (SD * F - u))
    g = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    norm = normalise_tangent(g, 0.1).flatten(1).norm(dim=1)
    torch.testing.assert_close(norm, g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 0.1))
    assert [tangent_warmup(k, 100) for k in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0] and tangent_warmup(3, 0) == 1.0


def test_adaptive_weighting_starts_at_one_and_the_loss_is_eq_9():
    head = AdaptiveWeight(16, SD)
    t = torch.tensor([0.2, 1.0], dtype=torch.float64)
    assert head(t).abs().max() == 0  # e^w = 1 everywhere at initialisation
    torch.nn.init.constant_(head.linear.bias, 0.3)
    w = head(t)
    F = torch.randn(2, 1, 4, 4, requires_grad=True)
    g = torch.randn(2, 1, 4, 4)
    loss = scm_loss(F, F.detach(), g, w)
    torch.testing.assert_close(loss, math.exp(0.3) * g.pow(2).flatten(1).mean(1) - 0.3)
    loss.sum().backward()  # d/dF: -2 e^w g / D
    torch.testing.assert_close(F.grad, -2 * math.exp(0.3) * g / 16)


@pytest.mark.parametrize("teacher_name", list(ZOO))
def test_student_starts_as_the_teacher_and_sees_its_ode(teacher_name, zoo, data):
    """f(x_t, t) = cos t x_t - sin t sd F is the teacher's x0 as dstudio samples it, and sCD's dx_t/dt at step 0 is
    the student's own sd F (the tangent's first term is 0), at every level from the teacher's least noisy step to
    the student's start."""
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(zoo[teacher_name])
    m = make(teacher).eval()
    reference, cond = teacher.for_sampling(), m.cond(torch.arange(4) % max(1, teacher.num_classes))
    sigmas = m.student.t_to_sigma(torch.linspace(0, float(m.student.sigma_to_t(torch.tensor(m.sigma_range[1]))), 9))
    g = torch.Generator().manual_seed(1)
    for sigma in sigmas:
        t = trigflow_time(sigma, SD).expand(4)
        x_t = math.cos(t[0]) * data.images[:4] + math.sin(t[0]) * SD * torch.randn(4, 1, 8, 8, generator=g)
        with torch.no_grad():
            F = m.consistency_fn(x_t, t, cond)
            f = math.cos(t[0]) * x_t - math.sin(t[0]) * SD * F
            want = reference(x_t / math.cos(t[0]), sigma, cond)
            torch.testing.assert_close(f, want, atol=1e-4, rtol=0)
            dx = m.velocity(data.images[:4], None, x_t, t, cond)
            torch.testing.assert_close(SD * F, dx, atol=2e-3 * max(1.0, float(sigma)), rtol=1e-3)


@pytest.mark.parametrize("teacher_name", ["v-zero-snr", "flow", "eps-uncond"])
def test_jvp_matches_finite_differences(teacher_name, zoo):
    """dF/dt along (dx_t/dt, 1) by torch.func.jvp (through the UNet's mid-block attention) equals central differences
    of the same network in float64 (diffusers rounds the time input to float32, which bounds the agreement), and the
    float32 finite-difference fallback with its default step is within a few percent. The times sit half-way between
    the teacher's integer steps, where its time input (linear in ln sigma between them) has no kink."""
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(zoo[teacher_name])
    m = make(teacher)
    cond = m.cond(torch.arange(4) % max(1, teacher.num_classes))
    steps = torch.tensor([20.5, 300.5, 600.5, 900.5], dtype=torch.float64) * (teacher.num_train_timesteps / 1000)
    t = trigflow_time(m.student.t_to_sigma(steps), SD).clamp(*m.t_range)
    torch.manual_seed(2)
    x_t, dx = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    m.student.model.double()
    jvp = m.tangent_derivative(x_t, t, dx, cond)
    error = lambda fd: ((fd - jvp).flatten(1).norm(dim=1) / jvp.flatten(1).norm(dim=1)).max()  # noqa: E731
    m.config.jvp, m.config.fd_step = "finite_difference", 0.01
    assert error(m.tangent_derivative(x_t, t, dx, cond)) < 1e-2
    m.student.model.float()
    m.config.fd_step = SCMConfig.fd_step  # 0.05 of a time step
    assert error(m.tangent_derivative(x_t.float(), t, dx.float(), cond)) < 2e-2


def test_sct_velocity_is_the_data_path_derivative(teacher, data):
    """sCT: dx_t/dt = cos(t) z - sin(t) x0, the derivative of cos(t) x0 + sin(t) z."""
    m = make(teacher, target="data")
    x0, z, t = data.images[:3], torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
    path = lambda s: s.cos().view(-1, 1, 1, 1) * x0 + s.sin().view(-1, 1, 1, 1) * z  # noqa: E731
    fd = (path(t + 1e-6) - path(t - 1e-6)) / 2e-6
    torch.testing.assert_close(m.velocity(x0, z, path(t).float(), t, None), fd.float(), atol=1e-4, rtol=0)


def test_loss_runs_both_modes_and_trains_the_head(teacher, data, tmp_path):
    for target in ("teacher", "data"):
        m = make(teacher, target=target, tangent_warmup=2)
        m.bind(RunContext(tmp_path, steps=4))
        m.train_only(m.phase("scm"))
        loss, logs = m.scm_objective(Batch.of(data.images[:6], data.labels[:6]), step=1)
        assert torch.isfinite(loss) and logs["r"] == 0.5
        loss.backward()
        assert m.weighting.linear.bias.grad.abs() > 0 and m.student.model.conv_out.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in m._teacher.unet.parameters())


@pytest.mark.parametrize("bad, message", [
    ({"mid_t": 1.6}, "method.mid_t=1.6 must lie in"), ({"p_std": 0}, "method.p_std=0"),
    ({"jvp": "forward"}, "method.jvp='forward' is not one of"), ({"target": "self"}, "method.target='self'"),
])
def test_bad_config_is_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(SCMConfig, bad, "method.")


def _run(tiny_teacher, run, steps, resume=False, **method):
    from dstudio.distill.core.teacher import load_teacher

    return fit_digits(make(load_teacher(tiny_teacher), tangent_warmup=3, **method), run, steps, resume)


@pytest.mark.parametrize("jvp", ["autograd", "finite_difference"])
def test_resume_is_bit_for_bit(tiny_teacher, tmp_path, jvp):
    trainer, _ = _run(tiny_teacher, tmp_path / "a", 4, jvp=jvp)
    resumed = stopped_and_resumed(lambda *a, **k: _run(tiny_teacher, *a, jvp=jvp, **k), tmp_path / "b")
    for name in ("student", "weighting"):
        for a, b in zip(getattr(trainer.method, name).parameters(), getattr(resumed.method, name).parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_draws_dstudio_images_in_plain_diffusers(tiny_teacher, tmp_path):
    """1 step, and 2 re-noising at t_mid = 1.1, in a process that cannot import dstudio."""
    from test_exports import LABELS, _reference, assert_same_images, plain_diffusers

    trainer, folder = _run(tiny_teacher, tmp_path / "run", 2)
    got = plain_diffusers(tmp_path, folder, (1, {"class_labels": LABELS}),
                          (2, {"class_labels": LABELS, "num_inference_steps": 2}))
    assert got["classes"]["scheduler"].endswith("schedulers.StudentScheduler")
    assert len(trainer.method.export_timesteps(2)) == 2
    for steps in (1, 2):
        assert_same_images(got["images"][steps - 1], _reference(trainer, seed=steps, steps=steps))
