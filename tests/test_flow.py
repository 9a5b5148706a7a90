"""Rectified flow / RF++ / InstaFlow / SlimFlow: time distributions, annealing, premetric, straightening, pairs,
phases, resume and export."""
import json
import math

import pytest
import torch
from torch import nn

from dstudio.distill.core.flow import FlowView, anneal_beta, anneal_noise, sample_u_shaped, u_shaped_density
from dstudio.distill.core.losses import ict_huber_c, pseudo_huber, rfpp_huber_c, rfpp_premetric
from fit import stopped_and_resumed

SMOKE = {"num_pairs": 24, "shard_size": 10, "solver_steps": 3, "reflow_steps": 2}


def test_u_shaped_density_is_a_symmetric_density_and_sampled_correctly():
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    p = u_shaped_density(t, 4.0)
    assert torch.trapezoid(p, t).item() == pytest.approx(1.0, abs=1e-8)
    torch.testing.assert_close(p, p.flip(0))
    assert p.argmin() == 50_000 and p[0] > 3.5 * p[50_000]  # mass at both ends, least in the middle (U shape)
    torch.manual_seed(0)
    s = sample_u_shaped(200_001, 4.0)
    assert len(s) == 200_001 and s.min() >= 0 and s.max() <= 1
    hist = torch.histc(s, bins=10, min=0, max=1) / len(s) * 10
    centres = (torch.arange(10, dtype=torch.float64) + 0.5) / 10
    expected = torch.stack([torch.trapezoid(u_shaped_density(torch.linspace(a, a + 0.1, 201, dtype=torch.float64)),
                                            dx=0.1 / 200) * 10 for a in centres - 0.05])
    torch.testing.assert_close(hist, expected, rtol=0.03, atol=0)


@pytest.mark.parametrize("kind", ["linear", "exp", "cos"])
def test_annealing_beta_schedules(kind):
    """yuanzhi-zhu/SlimFlow's randomness_schedule with K = 100: linear 1 - k/K; cos (1 + cos(pi k/K)) / 2, so
    (1 + cos(pi/4)) / 2 = 0.8536 at k = 25 and exactly 0.5 at k = 50; exp e^{-k/K}: e^{-1/4} = 0.7788, e^{-1/2} =
    0.6065, and e^{-1} = 0.3679 at k = K (it never reaches 0, as in the reference)."""
    values = [anneal_beta(k, 100, kind) for k in range(0, 151, 10)]
    assert values[0] == 1.0 and all(a > b or a == b == 0 for a, b in zip(values, values[1:]))
    expected = {"linear": (0.75, 0.5, 0.0, 0.0), "cos": (0.85355, 0.5, 0.0, 0.0),
                "exp": (0.77880, 0.60653, 0.36788, 0.22313)}[kind]
    for k, want in zip((25, 50, 100, 150), expected):
        assert anneal_beta(k, 100, kind) == pytest.approx(want, abs=1e-5)
    assert anneal_beta(7, 0, kind) == 0.0  # no annealing: plain reflow from the start
    half = anneal_beta(50, 100, kind)
    z, eps = torch.randn(20_000, 4), torch.randn(20_000, 4)
    mixed = anneal_noise(z, eps, half)
    assert mixed.var().item() == pytest.approx(1.0, abs=0.03)  # still unit Gaussian noise
    with pytest.raises(ValueError, match="annealing schedule 'tanh'"):
        anneal_beta(1, 10, "tanh")


def test_pseudo_huber_constants_and_values():
    assert ict_huber_c((3, 32, 32)) == pytest.approx(0.00054 * math.sqrt(3072))  # 0.0299, iCT's CIFAR value
    assert rfpp_huber_c((3, 32, 32)) == pytest.approx(0.00054 * 3072)            # 1.66, RF++'s
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([3.0, 0, 0, 4, 0, 0, 0, 0]).view(2, 1, 2, 2)
    torch.testing.assert_close(pseudo_huber(x, y, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    c = rfpp_huber_c((1, 2, 2))
    torch.testing.assert_close(rfpp_premetric(y, x), torch.tensor([(math.sqrt(25 + c**2) - c) / 4, 0.0]))


class VelocityMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], 1))


def _one_rf_velocity(x, t, m):
    """The exact 1-RF velocity from N(0, I) to the two points +-m: (E[x1 | x_t] - x_t) / (1 - t)."""
    t = t.reshape(-1, 1)
    e_x1 = m * torch.tanh((t * (x @ m.T)) / (1 - t) ** 2)
    return (e_x1 - x) / (1 - t)


def _euler(v, z, n):
    x, traj = z, [z]
    for i in range(n):
        t = torch.full((len(z),), i / n)
        x = x + v(x, t) / n
        traj.append(x)
    return x, traj


def test_reflow_straightens_paths_on_2d_gaussian_to_two_points():
    """Liu et al. 2023, Thm. 3.7: 2-RF on 1-RF's pairs has straighter paths (one Euler step reaches the ODE end)."""
    from dstudio.distill.core.denoiser import FlowDenoiser

    torch.manual_seed(0)
    m = torch.tensor([[2.0, 1.0]])
    z = torch.randn(2000, 2)
    x1, _ = _euler(lambda x, t: _one_rf_velocity(x, t.clamp(max=0.999), m), z, 200)

    student = FlowDenoiser(VelocityMLP(), time_scale=1.0)
    view = FlowView(student)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(1500):
        i = torch.randint(0, len(z), (256,))
        t = view.clamp(sample_u_shaped(256, 4.0)).float()
        x_t = t[:, None] * x1[i] + (1 - t[:, None]) * z[i]
        loss = rfpp_premetric(view.velocity(x_t, t), x1[i] - z[i]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def straightness(v):  # Liu et al. 2023, eq. 5: E int ||(X1 - X0) - v(X_t, t)||^2 dt along the ODE
        with torch.no_grad():
            end, traj = _euler(v, z[:500], 100)
            return sum(((end - z[:500]) - (b - a) * 100).pow(2).sum(1).mean() for a, b in zip(traj, traj[1:])) / 100

    one_rf = straightness(lambda x, t: _one_rf_velocity(x, t.clamp(max=0.999), m))
    two_rf = straightness(lambda x, t: view.velocity(x, t.double()))
    assert two_rf < 0.25 * one_rf, (one_rf, two_rf)
    with torch.no_grad():  # and one Euler step of 2-RF lands near the pair's end point
        one_step = view.one_step(z[:500])
    assert (one_step - x1[:500]).norm(dim=1).mean() < 0.25 * (z[:500] - x1[:500]).norm(dim=1).mean()


def test_pair_store_resumes_and_refuses_other_settings(tiny_teacher, tmp_path):
    from dstudio.distill.core.pairs import PairStore, PairStoreError
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(tiny_teacher)
    spec = {"teacher": "t", "solver": "heun", "solver_steps": 2, "guidance": 1.0, "num_pairs": 7, "shard_size": 3,
            "seed": 0, "shape": list(teacher.sample_shape)}
    labels = lambda idx: idx % teacher.num_classes  # noqa: E731
    store = PairStore(tmp_path / "pairs", spec).open()
    store.generate(teacher, labels, progress=False)
    full = store.load()
    assert full["z"].shape[0] == full["x1"].shape[0] == 7 and full["cond"].tolist()[:3] == [0, 1, 2]
    store.shard_path(1).unlink()  # as if killed before shard 1 was renamed into place
    (store.root / ".shard-00001.pt.tmp-123").write_bytes(b"half")
    store = PairStore(tmp_path / "pairs", spec).open()
    assert store.missing() == [1] and not list(store.root.glob(".shard-*"))
    store.generate(teacher, labels, progress=False)
    again = store.load()
    for k in ("z", "x1", "cond"):
        torch.testing.assert_close(again[k], full[k])
    with pytest.raises(PairStoreError, match="was made with solver_steps=2, this run asks for 5"):
        PairStore(tmp_path / "pairs", {**spec, "solver_steps": 5}).open()
    store.shard_path(0).write_bytes(b"garbage")
    with pytest.raises(PairStoreError, match="shard-00000.pt' is corrupt"):
        store.load()


def _train(name, teacher_dir, run, steps=4, resume=False, **method):
    from dstudio.distill.core.config import from_dict
    from dstudio.distill.core.method import get_method
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.core.trainer import Trainer, TrainerConfig

    cls = get_method(name)
    torch.manual_seed(0)
    m = cls(from_dict(cls.Config, {**SMOKE, "perceptual": "none", **method}), teacher=load_teacher(teacher_dir))
    cfg = TrainerConfig(steps=steps, batch_size=6, sample_every=100, checkpoint_every=2, grid_per_class=1, log_every=1)
    trainer = Trainer(m, cfg, run)
    return trainer, trainer.fit(resume=resume)


@pytest.mark.parametrize("name", ["rectified_flow", "slimflow"])
def test_phases_resume_and_export(tiny_teacher, tmp_path, name):
    from diffusers import DiffusionPipeline

    extra = {"student_width": 0.5} if name == "slimflow" else {}
    trainer, pipeline = _train(name, tiny_teacher, tmp_path / "a", **extra)
    m = trainer.method
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert any(k.startswith("reflow/") for k in logs[0]) and any(k.startswith("distill/") for k in logs[-1])
    if name == "slimflow":
        assert sum(p.numel() for p in m.student.parameters()) < 0.5 * sum(p.numel() for p in m.teacher_denoiser.parameters())

    # resume from the step-2 checkpoint of a second run reaches the same weights as the uninterrupted run
    resumed = stopped_and_resumed(lambda run, steps, **k: _train(name, tiny_teacher, run, steps, **k, **extra),
                                  tmp_path / "b")
    for a, b in zip(m.student.parameters(), resumed.method.student.parameters()):
        torch.testing.assert_close(a, b)

    # the exported folder loads with plain diffusers and is the student's flow Euler sampler
    pipe = DiffusionPipeline.from_pretrained(pipeline, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "FlowEulerScheduler"
    labels = torch.tensor([0, 1, 2])
    for steps in (1, 2):
        noise = torch.randn(3, *m.shape, generator=torch.Generator().manual_seed(steps))
        out = pipe(class_labels=labels, latents=noise, num_inference_steps=steps, output_type="pt").images * 2 - 1
        with trainer.ema.applied(m.student_net()):
            view = FlowView(m.student_net())
            from dstudio.samplers import sample_flow_euler
            ref = sample_flow_euler(view, noise, view.euler_times(steps), labels).clamp(-1, 1)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)


def test_rf_student_initialised_from_teacher_is_the_teachers_ode(tiny_teacher):
    """RF++'s diffusion initialisation: before training, x1_hat of the flow view is the teacher's x0 estimate."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.methods.rectified_flow import RectifiedFlow, RectifiedFlowConfig

    teacher = load_teacher(tiny_teacher)
    m = RectifiedFlow(RectifiedFlowConfig(perceptual="none"), teacher=teacher)
    x, t = torch.randn(4, *teacher.sample_shape), torch.tensor(0.3, dtype=torch.float64)
    labels = torch.arange(4)
    with torch.no_grad():
        got = FlowView(m.student).x1_hat(x, t, labels)
        want = teacher.denoiser(x / 0.3, (1 - t) / t, labels)
    torch.testing.assert_close(got, want)


def test_instaflow_on_a_tiny_text_pipeline(tiny_sd_dir, tmp_path):
    """Text-conditioned reflow + distillation on an SD-shaped latent pipeline; the export is a StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\n\n")
    trainer, pipeline = _train("instaflow", tiny_sd_dir, tmp_path / "run", prompts=str(prompts), guidance=2.0)
    pairs = trainer.method.pairs
    # the store keeps each pair's prompt id (i mod 2), the method its prompts' condition table
    assert pairs["cond"].tolist() == [i % 2 for i in range(24)] and pairs["x1"].shape == (24, 4, 8, 8)
    assert trainer.method.conditions.table.embeds.shape == (2, 8, 16)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "FlowEulerScheduler"
    images = pipe(["a red cat", "a dog"], num_inference_steps=1, guidance_scale=1.0, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and images.std() > 0


def test_text_teacher_without_prompts_is_refused(tiny_sd_dir, tmp_path):
    from dstudio.distill.core.errors import UserError

    with pytest.raises(UserError, match="needs prompts: give --prompts FILE"):
        _train("instaflow", tiny_sd_dir, tmp_path / "run")


def test_rf_distillation_pairs_come_from_the_2rf_student(tiny_teacher, tmp_path):
    """gnobitab/RectifiedFlow: distil the 2-rectified flow on pairs that the 2-RF itself generates from fresh
    noise (its EMA weights, as the reference's generate_data mode loads them), not on the teacher's pairs."""
    from dstudio.distill.methods._flow import flow_solve

    trainer, _ = _train("rectified_flow", tiny_teacher, tmp_path, steps=2)  # reflow_steps=2: reflow only so far
    m = trainer.method
    with torch.no_grad():  # make the EMA differ clearly from the live weights
        for s in trainer.ema.shadow:
            s.add_(0.01 * torch.randn_like(s))
    live = [p.detach().clone() for p in m.student.parameters()]
    source = m.phase("distill").batches()  # what the Trainer opens at the distillation's first step
    got = source.pairs
    assert got is m.distill_set and source.next(4, "cpu").z.shape == (4, *m.shape)
    assert (tmp_path / "pairs-2rf" / "manifest.json").is_file() and len(got["z"]) == SMOKE["num_pairs"]
    assert not torch.equal(got["z"], m.pairs["z"])  # fresh noise, not the teacher pairs' noise
    torch.testing.assert_close(got["cond"], m.pairs["cond"])  # balanced classes, as the teacher's pairs
    with torch.no_grad(), trainer.ema.applied(m.student):
        want = flow_solve(m.student, got["z"], got["cond"], SMOKE["solver_steps"])
        not_live = flow_solve(m.student, got["z"][:4], got["cond"][:4], SMOKE["solver_steps"])
    torch.testing.assert_close(got["x1"], want, atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(live, m.student.parameters()))  # live weights put back
    with torch.no_grad():
        from_live = flow_solve(m.student, got["z"][:4], got["cond"][:4], SMOKE["solver_steps"])
    assert not torch.allclose(from_live, not_live)  # so the store did come from the EMA weights
    # the old behaviour stays available
    trainer, _ = _train("rectified_flow", tiny_teacher, tmp_path / "t", steps=3, distill_pairs="teacher")
    assert trainer.method.distill_set is None and not (tmp_path / "t" / "pairs-2rf").exists()


def test_slimflow_annealing_reflow_is_plain_l2_and_the_guide_is_the_ema(tiny_teacher, tmp_path):
    """yuanzhi-zhu/SlimFlow: annealing reflow trains loss_type l2 (mean squared velocity error, uniform weights,
    no LPIPS); distillation uses LPIPS; the guide is the 2-RF checkpoint's EMA (ema_teacher.copy_to)."""
    from dstudio.distill.core.flow import sample_uniform

    trainer, _ = _train("slimflow", tiny_teacher, tmp_path, steps=2, student_width=0.5, anneal_steps=0, hflip=False)
    m = trainer.method
    calls = []

    def fake_perceptual(a, b, cond=None):  # stands in for the perceptual distance: counts its calls
        calls.append(len(a))
        return (a - b).abs().flatten(1).mean(1)

    m.perceptual = fake_perceptual
    z, x1 = torch.randn(5, *m.shape), torch.randn(5, *m.shape)
    cond = torch.arange(5)
    torch.manual_seed(1)
    loss, logs = m.annealing_loss(z, x1, cond, step=0)
    assert calls == [] and "perceptual" not in logs and logs["beta"] == 0.0
    torch.manual_seed(1)
    torch.randn_like(z)  # anneal_noise's draw (beta = 0: z is kept)
    view = FlowView(m.student)
    t = sample_uniform(5).clamp(max=view.t_max)
    tt = t.float().view(-1, 1, 1, 1)
    x_t = tt * x1 + (1 - tt) * z
    with torch.no_grad():
        v_hat = (view.x1_hat(x_t, t, cond) - x_t) / (1 - tt)
    assert loss.item() == pytest.approx(((v_hat - (x1 - z)) ** 2).mean().item(), rel=1e-5)

    with torch.no_grad():
        for s in trainer.ema.shadow:
            s.add_(0.01)
    distill = [p for p in m.phases() if p.name == "distill"][0]
    m.on_phase_start(distill, distill.start)  # the Trainer's hook at the distillation's first step
    m.guided_loss(z, x1, cond)
    assert calls  # distillation does use LPIPS
    guide = dict(m.guide.named_parameters())
    for (name, p), s in zip(m.student.named_parameters(), trainer.ema.shadow):
        torch.testing.assert_close(guide[name], s)
        assert not torch.equal(p, s)


@pytest.mark.parametrize("family", [None, "sd15", "sd3", "flux-schnell", "pixart_sigma", "dit"])
def test_teacher_feature_distance_is_offline_and_differentiable(family, tiny_teacher, tiny_family, one_thread):
    """method.perceptual=teacher: zero between equal images, positive between different ones, the gradient reaches
    the student's images and none of the frozen teacher's weights, on a pixel UNet and every kind of family backbone."""
    from dstudio.distill.core.losses import TeacherFeatureDistance
    from dstudio.distill.core.teacher import load_teacher

    teacher = load_teacher(tiny_teacher if family is None else tiny_family(family))
    teacher.network.requires_grad_(False)
    if teacher.takes_prompts:
        cond = teacher.conditions(["a red car", "a blue dog"])
    else:
        cond = teacher.cond(torch.tensor([3, 700] if family == "dit" else [1, 2]))
    distance = TeacherFeatureDistance(teacher.denoiser, teacher.feature_taps)
    x = torch.randn(2, *teacher.sample_shape)
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = distance(x_hat, x, cond)
    assert d.shape == (2,) and (d > 0).all() and distance(x, x, cond).abs().max() < 1e-6
    d.sum().backward()
    assert x_hat.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.network.parameters())
