"""A student that starts from its teacher starts AS its teacher: at step 0 its x0 equals the teacher's x0 as dstudio
samples the teacher (clipping included) at every noise level the student is trained at, for every parameterisation
(eps, v, sample, flow matching) and every method that initialises from the teacher (issue 29)."""
import pytest
import torch

from conftest import ZOO
from dstudio.distill.core.config import from_dict
from dstudio.distill.core.denoiser import MAX_START_GAIN, DiscreteDenoiser
from dstudio.distill.core.flow import FlowView
from dstudio.distill.core.method import get_method
from dstudio.distill.core.teacher import load_teacher

FROM_TEACHER = {  # method: the config under which its student is a copy of the teacher
    "dmd2": dict(data="digits", head_width=8),
    "msd": dict(data="digits", students=2, head_width=8),
    "sim": {},
    "rectified_flow": dict(perceptual="none"),
    "consistency": dict(data="digits", init="teacher"),
}


def students(method) -> list:
    return list(method.student) if isinstance(method.student, torch.nn.ModuleList) else [method.student]


def trained_sigmas(student, n: int = 12) -> torch.Tensor:
    """Levels from the teacher's least noisy step up to the student's noisiest one (its start)."""
    t = torch.linspace(0, float(student.sigma_to_t(torch.tensor(student.sigma_max))), n)
    return student.t_to_sigma(t)


@pytest.mark.parametrize("teacher_name", list(ZOO))
@pytest.mark.parametrize("method_name", list(FROM_TEACHER))
def test_student_starts_as_the_teacher_samples(method_name, teacher_name, zoo, data):
    teacher = load_teacher(zoo[teacher_name])
    if method_name == "msd" and not teacher.num_classes:
        pytest.skip("msd needs a class-conditional teacher")
    cls = get_method(method_name)
    torch.manual_seed(0)
    method = cls(from_dict(cls.Config, FROM_TEACHER[method_name]), teacher=teacher,
                 data=data if cls.needs_data else None).eval()
    reference = teacher.for_sampling()
    cond = method.cond(torch.arange(4) % max(1, teacher.num_classes))
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for student in students(method):
        assert student.prediction_type == teacher.denoiser.prediction_type
        for sigma in trained_sigmas(student):
            x = data.images[:4] + sigma * torch.randn(4, 1, 8, 8, generator=g)
            with torch.no_grad():
                want, got = reference(x, sigma, cond), student(x, sigma, cond)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            clipped += int((want.abs() == 1).sum())
        if method_name == "rectified_flow":  # its one step from noise is read at the student's noisiest level
            assert FlowView(student).t_min == pytest.approx(1 / (1 + student.sigma_max))
    assert (clipped > 0) == (teacher.clipping is not None)  # the clip is exercised where the teacher has one


def test_students_learn_through_the_clip(zoo):
    """The teacher's clip is straight-through in backward: a saturated pixel still gets a gradient."""
    teacher = load_teacher(zoo["eps-cosine-clip"])
    net = teacher.unet.__class__.from_config(teacher.unet.config)
    student = teacher.student(net)
    x = 50 * torch.randn(2, 1, 8, 8)
    sigma = torch.tensor(student.sigma_max)
    x0 = student(x, sigma, torch.tensor([1, 2]))
    assert (x0.abs() == 1).float().mean() > 0.5
    x0.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [net.conv_out.weight])


@pytest.mark.parametrize("betas, prediction, want_t", [
    (dict(beta_schedule="linear"), "epsilon", None),
    (dict(beta_schedule="squaredcos_cap_v2"), "epsilon", None),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), "epsilon", None),  # SD 1.5
    (dict(beta_schedule="squaredcos_cap_v2"), "v_prediction", 999),
    (dict(beta_schedule="linear"), "sample", 999),
])
def test_students_start_where_the_x0_gain_is_bounded(betas, prediction, want_t):
    """An eps backbone's x0 = x - sigma eps has gain sigma: its students start at the last step with sigma <= 4;
    v (gain sigma alpha < 1) and sample (1) students start at the teacher's last step."""
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(**betas).alphas_cumprod.double()
    d = DiscreteDenoiser(torch.nn.Identity(), abar, prediction)
    sigma = ((1 - abar) / abar).sqrt()
    if want_t is None:
        want_t = int((sigma <= MAX_START_GAIN).nonzero().max())
        assert want_t < 990 and sigma[want_t + 1] > MAX_START_GAIN
    assert d.start_t() == want_t
    assert d.student(torch.nn.Identity()).sigma_max == pytest.approx(float(sigma[want_t]), rel=1e-6)


def test_start_gain_is_a_method_option(zoo, data):
    """`--set method.start_gain=G` moves where an eps teacher's students start (14.62: SD 1.5's last step, DMD2's)."""
    teacher = load_teacher(zoo["eps-cosine-clip"])
    cls = get_method("dmd2")
    starts = {}
    for gain in (1.0, 4.0, 50.0):
        method = cls(from_dict(cls.Config, {**FROM_TEACHER["dmd2"], "start_gain": gain}), teacher=teacher, data=data)
        starts[gain] = method.timesteps[0]
        assert method.timesteps[0] == teacher.denoiser.start_t(gain)
        assert float(method.student.sigma_max) <= gain * 1.0001
    assert starts[1.0] < starts[4.0] < starts[50.0]


def test_reflow_trains_the_state_its_sampler_starts_from(zoo, data, monkeypatch):
    """An eps teacher's flow student starts at a finite level (t_min > 0); reflow times below t_min keep their state
    x_t (pure noise at t = 0) read at t_min, which is what the one-step sampler feeds it, not t_min's own mixture."""
    teacher = load_teacher(zoo["eps-uncond"])
    cls = get_method("rectified_flow")
    method = cls(from_dict(cls.Config, FROM_TEACHER["rectified_flow"]), teacher=teacher).eval()
    view = FlowView(method.student)
    assert view.t_min > 0.05  # the start-gain cap: an eps flow student starts at sigma <= 14.62
    monkeypatch.setattr("dstudio.distill.methods._flow.sample_u_shaped",  # RF++'s times, all drawn at t = 0
                        lambda n, a, device: torch.zeros(n, dtype=torch.float64))
    z, x1 = torch.randn(4, 1, 8, 8), data.images[:4]
    with torch.no_grad():
        loss, _ = method.reflow_loss(method.student, z, x1, None)
        first_euler_v = view.one_step(z) - z  # v(z, 0) of the exported one-step sampler
    assert loss.item() == pytest.approx(method.premetric(first_euler_v, x1 - z).mean().item(), rel=1e-5)
