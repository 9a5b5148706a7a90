"""MeanFlow (Geng et al. 2025): (r, t) sampling, adaptive weights, CFG in training, the MeanFlow identity on a flow
whose average velocity is known, JVP against finite differences, the flow-map UNet and its scheduler, a student that
starts as its teacher, resume, and the export in plain diffusers (1 and 2 steps)."""
import pytest
import torch

from conftest import ZOO
from dstudio.distill.core.config import ConfigError, from_dict
from dstudio.distill.core.flow import FlowView
from dstudio.distill.core.interval_unet import IntervalUNet2DModel
from dstudio.distill.core.method import Batch, RunContext
from dstudio.distill.methods._continuous import directional_derivative
from dstudio.distill.methods.meanflow import (MeanFlow, MeanFlowConfig, adaptive_weight, guided_velocity,
                                              meanflow_target, sample_times)
from fit import fit_digits, stopped_and_resumed


def make(teacher, **cfg):
    torch.manual_seed(0)
    return MeanFlow(from_dict(MeanFlowConfig, {"data": "digits", **cfg}), teacher=teacher)


def test_times_are_sorted_logit_normal_pairs_with_a_share_of_r_equal_t():
    torch.manual_seed(0)
    r, t = sample_times(100_000, -0.4, 1.0, 0.25, (0.0, 1.0))
    assert (r <= t).all() and ((r < t).double().mean().item() == pytest.approx(0.25, abs=0.01))
    r, t = sample_times(100_000, -0.4, 1.0, 1.0, (0.0, 1.0))  # every pair: its two draws are logit-normal
    logit = torch.cat([r, t]).logit()
    assert logit.mean().item() == pytest.approx(-0.4, abs=0.01) and logit.std().item() == pytest.approx(1.0, abs=0.01)
    r, t = sample_times(1000, -0.4, 1.0, 0.5, (0.1, 0.9))
    assert r.min() >= 0.1 and t.max() <= 0.9


def test_adaptive_weight_and_guided_velocity_closed_forms():
    err = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    torch.testing.assert_close(adaptive_weight(err, 1.0, 1e-3), 1 / (err.detach() + 1e-3))
    torch.testing.assert_close(adaptive_weight(err, 0.5, 1e-3), (err.detach() + 1e-3) ** -0.5)
    assert not adaptive_weight(err, 1.0, 1e-3).requires_grad  # sg(w)
    v, uc, un = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    assert guided_velocity(v, uc, un, 1.0, 0.0) == v  # omega = 1, kappa = 0: no guidance
    assert guided_velocity(v, uc, un, 2.0, 0.5) == 2 * 1 + 0.5 * 2 + (1 - 2.5) * 4


def gaussian_flow(s: float):
    """Data N(0, s^2) per pixel, z_t = (1 - t) x + t eps: z_t ~ N(0, sigma_t^2), sigma_t^2 = (1 - t)^2 s^2 + t^2;
    the ODE dz/dt = v(z, t) = z sigma_t' / sigma_t keeps z / sigma_t, so u(z_t, r, t) = z_t (1 - sigma_r / sigma_t) /
    (t - r)."""
    def sigma(t):
        return ((1 - t) ** 2 * s**2 + t**2).sqrt().view(-1, 1, 1, 1)

    def v(z, t):
        return z * ((t - (1 - t) * s**2).view(-1, 1, 1, 1) / sigma(t) ** 2)

    def u(z, r, t):
        return z * (1 - sigma(r) / sigma(t)) / (t - r).view(-1, 1, 1, 1)

    return v, u


@pytest.mark.parametrize("mode, tol", [("autograd", 1e-10), ("finite_difference", 1e-6)])
def test_the_meanflow_identity_holds_for_the_true_average_velocity(mode, tol):
    """u = v - (t - r) du/dt with du/dt along (v, 0, 1) on (z, r, t): the true u is the fixed point of the target."""
    v, u = gaussian_flow(0.7)
    torch.manual_seed(0)
    z = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    r = torch.tensor([0.0, 0.2, 0.5, 0.05], dtype=torch.float64)
    t = torch.tensor([1.0, 0.6, 0.9, 0.3], dtype=torch.float64)
    step = torch.full_like(t, 1e-5)
    du_dt = directional_derivative(u, (z, r, t), (v(z, t), torch.zeros_like(r), torch.ones_like(t)), mode, step, step)
    torch.testing.assert_close(meanflow_target(v(z, t), du_dt, r, t), u(z, r, t), atol=tol, rtol=0)
    wrong = directional_derivative(u, (z, r, t), (v(z, t), torch.ones_like(r), torch.zeros_like(t)), mode, step, step)
    assert (meanflow_target(v(z, t), wrong, r, t) - u(z, r, t)).abs().max() > 1e-3  # the tangent's order matters


def test_interval_unet_is_its_unet_at_first_and_reads_h_from_a_channel(teacher, tmp_path):
    net = IntervalUNet2DModel.around(teacher.unet, 1000.0)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        bare = teacher.unet(x, t, class_labels=labels).sample
        torch.testing.assert_close(net(x, t, labels, interval=torch.tensor([0.3, 0.9])).sample, bare, atol=0, rtol=0)
        torch.nn.init.normal_(net.interval_embedding.linear_2.weight)
        h = torch.tensor([0.3, 0.9])
        given = net(x, t, labels, interval=h).sample
        channel = torch.cat([x, h.view(-1, 1, 1, 1).expand(2, 1, 8, 8)], 1)
        torch.testing.assert_close(net(channel, t, labels).sample, given, atol=0, rtol=0)
        assert not torch.allclose(given, bare)
        torch.testing.assert_close(net(x, t, labels).sample, net(x, t, labels, 0.0).sample)  # h = 0 by default
    net.save_pretrained(tmp_path / "unet")
    loaded = IntervalUNet2DModel.from_pretrained(tmp_path / "unet")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, labels, interval=h).sample, given)


@pytest.mark.parametrize("teacher_name", ["v-zero-snr", "eps-cosine-clip", "flow"])
def test_flow_euler_scheduler_gives_the_step_length_as_a_channel(zoo, teacher_name):
    """h = next flow time - the flow time the model is read at (the student's noisiest level at t = 0)."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.samplers import FlowEulerScheduler, scheduler_from_teacher

    teacher = load_teacher(zoo[teacher_name])
    student = teacher.student(teacher.unet)
    sched = scheduler_from_teacher(FlowEulerScheduler, teacher.scheduler, interval_input=True,
                                   prediction_type=student.prediction_type, sigma_max=student.sigma_max)
    read = FlowView(student).t_min if student.prediction_type != "flow" else 0.0
    for n, want in ((1, [1 - read]), (2, [0.5 - read, 0.5])):
        sched.set_timesteps(n)
        x = torch.randn(2, 1, 8, 8)
        got = []
        for s in sched.timesteps:
            got.append(float(sched.scale_model_input(x, s)[:, -1].unique()))
            x = sched.step(torch.zeros_like(x), s, x).prev_sample
        assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("teacher_name", list(ZOO))
def test_student_starts_as_the_teacher_velocity_at_every_interval(teacher_name, zoo, data):
    """u(z_t, r, t) at step 0 is the teacher's velocity (z_t - x0) / t, x0 as dstudio samples the teacher, for r = t and
    r < t alike, across the student's time range."""
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(zoo[teacher_name])
    m = make(teacher).eval()
    reference, cond = teacher.for_sampling(), m.cond(torch.arange(4) % max(1, teacher.num_classes))
    lo, hi = m.t_range
    for t in torch.linspace(lo, hi, 7, dtype=torch.float64):
        tt = t.expand(4)
        z = (1 - t.float()) * data.images[:4] + t.float() * torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            want = (z - reference(z / (1 - t).float(), t / (1 - t), cond)) / t.float()
            for r in (tt, tt * 0.3):
                torch.testing.assert_close(m.average_velocity(z, r, tt, cond), want, atol=1e-4 / float(t), rtol=1e-4)


@pytest.mark.parametrize("teacher_name", ["v-zero-snr", "flow", "sample-linear"])
def test_jvp_matches_finite_differences_on_the_student(zoo, teacher_name):
    """du/dt along (v, 0, 1) by torch.func.jvp equals the method's central differences of the same network in float64
    (diffusers rounds time inputs to float32, which bounds the agreement), and its float32 fallback with the default
    step is within a few percent; the interval embedding is moved away from zero so that r and t enter separately."""
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(zoo[teacher_name])
    m = make(teacher)
    torch.nn.init.normal_(m.student.model.net.interval_embedding.linear_2.weight, std=0.1)
    cond = m.cond(torch.arange(4) % max(1, teacher.num_classes))
    torch.manual_seed(1)
    z, v = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.2, 0.6], dtype=torch.float64)
    t = torch.tensor([0.25, 0.5, 0.7, 0.9], dtype=torch.float64)
    m.student.model.double()
    jvp = m.total_derivative(z, r, t, v, cond)
    error = lambda fd: ((fd - jvp).flatten(1).norm(dim=1) / jvp.flatten(1).norm(dim=1)).max()  # noqa: E731
    m.config.jvp, m.config.fd_step = "finite_difference", 0.01
    assert error(m.total_derivative(z, r, t, v, cond)) < 1e-2
    m.student.model.float()
    m.config.fd_step = MeanFlowConfig.fd_step
    assert error(m.total_derivative(z.float(), r, t, v.float(), cond)) < 2e-2


@pytest.mark.parametrize("cfg", [{}, {"target": "data"}, {"jvp": "finite_difference"},
                                 {"cfg_omega": 2.0, "cfg_kappa": 0.5, "cfg_drop": 0.5}])
def test_loss_is_finite_and_reaches_only_the_student(teacher, data, tmp_path, cfg):
    m = make(teacher, ratio_r_neq_t=1.0, **cfg)  # at step 0 a pair with r = t has u = v: no gradient
    m.bind(RunContext(tmp_path, steps=4))
    m.train_only(m.phase("meanflow"))
    loss, logs = m.meanflow_objective(Batch.of(data.images[:8], data.labels[:8]), step=0)
    assert torch.isfinite(loss) and logs["meanflow"] <= 8.0  # w ||err||^2 < 1 per sample
    loss.backward()
    assert m.student.model.net.unet.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m._teacher.unet.parameters())


def test_bad_config_and_cfg_on_an_unconditional_teacher(zoo):
    from dstudio.distill.core.teacher import load_teacher

    with pytest.raises(ConfigError, match="method.ratio_r_neq_t=1.5 must be in"):
        from_dict(MeanFlowConfig, {"ratio_r_neq_t": 1.5}, "method.")
    with pytest.raises(ConfigError, match="need a class-conditional teacher"):
        make(load_teacher(zoo["eps-uncond"]), cfg_omega=2.0)


def _run(tiny_teacher, run, steps, resume=False, **method):
    from dstudio.distill.core.teacher import load_teacher

    return fit_digits(make(load_teacher(tiny_teacher), **method), run, steps, resume)


def test_resume_is_bit_for_bit(tiny_teacher, tmp_path):
    trainer, _ = _run(tiny_teacher, tmp_path / "a", 4)
    resumed = stopped_and_resumed(lambda *a, **k: _run(tiny_teacher, *a, **k), tmp_path / "b")
    for a, b in zip(trainer.method.student.parameters(), resumed.method.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_draws_dstudio_images_in_plain_diffusers(tiny_teacher, tmp_path):
    """1 step, and 2 (t: 1 -> 0.5 -> 0), in a process that cannot import dstudio; dstudio's own loader too."""
    from dstudio.distill.core.teacher import load_pipeline
    from test_exports import LABELS, _reference, assert_same_images, plain_diffusers

    trainer, folder = _run(tiny_teacher, tmp_path / "run", 2)
    calls = [(n, {"class_labels": LABELS, "num_inference_steps": n}) for n in (1, 2)]
    got = plain_diffusers(tmp_path, folder, *calls)
    assert got["classes"]["unet"].endswith("interval_unet.IntervalUNet2DModel")
    assert got["classes"]["scheduler"].endswith("schedulers.FlowEulerScheduler")
    for steps in (1, 2):
        assert_same_images(got["images"][steps - 1], _reference(trainer, seed=steps, steps=steps))
    pipe = load_pipeline(folder)
    own = pipe(class_labels=LABELS, num_inference_steps=2, generator=torch.Generator().manual_seed(2), output_type="pt")
    assert_same_images(own.images, _reference(trainer, seed=2, steps=2))
