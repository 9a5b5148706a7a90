"""SIM / SiD: the generator loss against finite differences and the 1-D Gaussian direction; phases; export."""
import pytest
import torch

from dstudio.distill.core.method import Batch
from dstudio.distill.methods.sim import SIM, SIMConfig, sid_generator_loss, sim_generator_loss


def test_sim_loss_gradient_matches_finite_differences():
    """Gradient through y_real(x_g) into x_g: u = sg[...] and w = sg[...] are constants of the surrogate."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 4, dtype=torch.float64) * 0.3

    def y_real(x):  # a smooth stand-in for the teacher's x0 prediction
        return torch.tanh(x.view(2, 4) @ A).view_as(x)

    y_fake = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    c = 0.1
    (g,) = torch.autograd.grad(sim_generator_loss(x, y_real(x), y_fake, c), x)
    with torch.no_grad():
        y0 = y_real(x)
        dims = (1, 2, 3)
        diff = y0 - y_fake
        u = diff / (diff.pow(2).sum(dims, keepdim=True) + c**2).sqrt()
        w = (x - y0).abs().mean(dims, keepdim=True)

    def surrogate(xx):  # the same loss with u and w frozen at x
        return ((u * (y_real(xx) - xx)) / w).sum(dims).mean()

    eps, fd = 1e-6, torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        fd.view(-1)[i] = (surrogate(x + e) - surrogate(x - e)) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss", ["sim", "sid"])
def test_generator_loss_pulls_the_generator_mean_towards_the_data(loss):
    """1-D Gaussians, equal variances: descending the loss moves mu_g towards mu_r."""
    torch.manual_seed(0)
    mu_r, s, sigma, n = 1.0, 0.8, 0.7, 100_000
    mu_g = torch.tensor(-0.5, requires_grad=True)
    x_g = (mu_g + s * torch.randn(n)).view(n, 1, 1, 1)
    x_t = x_g + sigma * torch.randn_like(x_g)

    def D(x, mu):
        return (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)

    y_r, y_f = D(x_t, mu_r), D(x_t, mu_g.detach())  # the fake score tracks the generator; no grad into psi
    value = sim_generator_loss(x_g, y_r, y_f, 1e-3) if loss == "sim" else sid_generator_loss(x_g, y_r, y_f)
    (grad,) = torch.autograd.grad(value, mu_g)
    assert grad.item() < 0  # gradient descent raises mu_g towards mu_r


def test_sim_phases_and_export(tiny_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.core.trainer import Trainer, TrainerConfig

    torch.manual_seed(0)
    m = SIM(SIMConfig(lr_generator=1e-3, lr_fake=1e-3), teacher=load_teacher(tiny_teacher))
    trainer = Trainer(m, TrainerConfig(steps=2, batch_size=8, sample_every=100, log_every=1), tmp_path)
    before = {k: [p.detach().clone() for p in getattr(m, k).parameters()] for k in ("student", "fake_score")}
    trainer.run_phase(m.phase("fake"), [Batch.data_free(8)])
    moved = {k: any(not torch.equal(a, b) for a, b in zip(before[k], getattr(m, k).parameters())) for k in before}
    assert moved == {"student": False, "fake_score": True}
    out = trainer.fit()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert pipe.scheduler.config.timesteps == [m.student_t] and len(pipe(class_labels=[4]).images) == 1


def test_generator_sigmas_follow_sid_ramp_without_the_highest_levels():
    """SiD's sid_loss.py: sigma = ramp(1 - t), t ~ U[0, tmax/1000) with tmax 800, EDM's ramp (0.002, 80, rho 7).
    t = 0 gives sigma_min; t -> 0.8 gives ramp(0.2) = (0.8 * 80^(1/7) + 0.2 * 0.002^(1/7))^7 ~ 24.4, so the
    levels above ~24.4 are left out (the bug kept the top of the grid instead: [0.15, 80])."""
    from dstudio.distill.methods.sim import sid_generator_sigmas

    torch.manual_seed(0)
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    top = (hi + 0.2 * (lo - hi)) ** 7
    assert top == pytest.approx(24.4, abs=0.05)
    s = sid_generator_sigmas(50_000, 0.8)
    assert s.min() >= 0.002 and s.max() <= top
    assert s.min() < 0.0021 and s.max() > 0.99 * top  # both ends are reached
    # the median is ramp(1 - 0.4) = ramp(0.6): uniform t over [0, 0.8)
    assert s.median().item() == pytest.approx((hi + 0.6 * (lo - hi)) ** 7, rel=0.05)  # steep in t: loose


@pytest.mark.parametrize("loss", ["sim", "sid"])
def test_generator_step_builds_a_fake_score_graph_only_for_sid(tiny_teacher, loss):
    """SIM's loss sees y_fake only under sg[.]: no graph through the fake score; SiD's alpha term needs one."""
    from dstudio.distill.core.teacher import load_teacher

    torch.manual_seed(0)
    m = SIM(SIMConfig(loss=loss), teacher=load_teacher(tiny_teacher))
    m.train_only(m.phase("generator"))
    seen = []
    m.fake_score.model.register_forward_hook(lambda mod, args, out: seen.append(out.sample.requires_grad))
    value, _ = m.generator_loss(Batch.data_free(4), 0)
    value.backward()
    assert seen == [loss == "sid"]
    assert all(p.grad is None for p in m.fake_score.parameters())


def test_score_space_huber_constant_scales_with_sigma_squared():
    """SIM's distance on the score difference (y_r - y_f) / sigma^2 is the x0-space distance with constant c sigma^2:
    the per-image loss with c sigma^2 equals the score-space formula computed directly."""
    from dstudio.distill.methods.sim import huber_constant

    torch.manual_seed(0)
    x_g, y_r, y_f = torch.randn(3, 3, 1, 4, 4).unbind(0)
    sigma, c = torch.tensor([0.1, 1.0, 20.0]), 0.01
    got = torch.stack([sim_generator_loss(x_g[i:i + 1], y_r[i:i + 1], y_f[i:i + 1],
                                          huber_constant(c, sigma, "score")[i:i + 1]) for i in range(3)])
    for i, s in enumerate(sigma):
        d = (y_r[i] - y_f[i]) / s**2  # the score difference
        u = d / (d.pow(2).sum() + c**2).sqrt()
        want = (u * (y_r[i] - x_g[i])).sum() / (x_g[i] - y_r[i]).abs().mean()
        torch.testing.assert_close(got[i], want)
    assert huber_constant(c, sigma, "x0") == c
    batch = sim_generator_loss(x_g, y_r, y_f, huber_constant(c, sigma, "score"))
    torch.testing.assert_close(batch, got.mean())
