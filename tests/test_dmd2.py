"""DMD2: the distribution-matching gradient against the analytic KL gradient, phases, resume and export."""
import json

import pytest
import torch

from dstudio.distill.core.method import Batch
from dstudio.distill.core.trainer import Trainer, TrainerConfig
from dstudio.distill.data import digits8
from dstudio.distill.methods.dmd2 import DMD2, DMD2Config, dmd_gradient, dmd_loss


def gaussian_denoiser(x_t, mu, s, sigma):
    """E[x0 | x_t] for x0 ~ N(mu, s^2), x_t = x0 + sigma n."""
    return (s**2 * x_t + sigma**2 * mu) / (s**2 + sigma**2)


def test_dmd_gradient_is_the_kl_gradient_on_1d_gaussians():
    """d/d mu_g KL(q_sigma || p_sigma) = (mu_g - mu_r) / (s_r^2 + sigma^2) for q = N(mu_g, s_g^2), p = N(mu_r, s_r^2)."""
    torch.manual_seed(0)
    mu_r, s_r, s_g, sigma, n = 0.5, 1.2, 0.7, 0.8, 400_000
    mu_g = torch.tensor(-0.3, requires_grad=True)
    x = (mu_g + s_g * torch.randn(n)).view(n, 1, 1, 1)
    x_t = (x + sigma * torch.randn_like(x)).detach()
    x0_real = gaussian_denoiser(x_t, mu_r, s_r, sigma)
    x0_fake = gaussian_denoiser(x_t, mu_g.detach(), s_g, sigma)
    g = dmd_gradient(x.detach(), x0_real, x0_fake)
    # the normaliser: the raw direction p_real - p_fake = D_fake - D_real divided by mean_CHW |p_real|
    torch.testing.assert_close(g * (x.detach() - x0_real).abs(), x0_fake - x0_real, rtol=1e-5, atol=1e-6)
    # through the stop-gradient surrogate, the score difference (D_fake - D_real) / sigma^2 moves mu_g by dKL/dmu_g
    (grad_mu,) = torch.autograd.grad(dmd_loss(x, (x0_fake - x0_real) / sigma**2), mu_g)
    analytic = (mu_g.item() - mu_r) / (s_r**2 + sigma**2)
    assert grad_mu.item() == pytest.approx(analytic, rel=0.03)


@pytest.fixture
def dmd2(tiny_teacher):
    from dstudio.distill.core.teacher import load_teacher

    torch.manual_seed(0)
    cfg = DMD2Config(data="digits", num_steps=2, critic_ratio=2, lr_generator=1e-3, lr_critic=1e-3, head_width=8)
    return DMD2(cfg, teacher=load_teacher(tiny_teacher), data=digits8(8))


def _snap(m):
    return [p.detach().clone() for p in m.parameters()]


def _moved(before, m):
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_phases_touch_only_their_networks(dmd2, tmp_path):
    trainer = Trainer(dmd2, TrainerConfig(steps=1, batch_size=8), tmp_path, data=digits8(8))
    batch = trainer.stream.next("cpu")
    nets = {"student": dmd2.student, "fake_score": dmd2.fake_score, "head": dmd2.head, "teacher": dmd2.real_score}
    for phase, trained in ((trainer.phases[0], {"student"}), (trainer.phases[1], {"fake_score", "head"})):
        before = {k: _snap(v) for k, v in nets.items()}
        trainer.run_phase(phase, [batch])
        for k, v in nets.items():
            assert _moved(before[k], v) == (k in trained), (phase.name, k)


def test_update_ratio_and_resume_bit_for_bit(tiny_teacher, tmp_path):
    from dstudio.distill.core.teacher import load_teacher

    def make():
        torch.manual_seed(0)
        cfg = DMD2Config(data="digits", num_steps=2, critic_ratio=3, lr_generator=1e-3, lr_critic=1e-3, head_width=8)
        return DMD2(cfg, teacher=load_teacher(tiny_teacher), data=digits8(8))

    cfg = dict(batch_size=8, checkpoint_every=2, sample_every=100, log_every=1)
    a = make()
    Trainer(a, TrainerConfig(steps=4, **cfg), tmp_path / "a", data=digits8(8)).fit(export=False)
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [("generator/dm" in r) for r in logs] == [True, False, False, True]
    b = make()
    Trainer(b, TrainerConfig(steps=2, **cfg), tmp_path / "b", data=digits8(8)).fit(export=False)
    c = make()
    Trainer(c, TrainerConfig(steps=4, **cfg), tmp_path / "b", data=digits8(8)).fit(resume=True, export=False)
    for name in ("student", "fake_score", "head"):
        for p, q in zip(getattr(a, name).parameters(), getattr(c, name).parameters()):
            assert torch.equal(p, q), name


def test_export_is_a_few_step_pipeline(dmd2, tmp_path):
    from diffusers import DiffusionPipeline

    out = Trainer(dmd2, TrainerConfig(steps=1, batch_size=8, sample_every=100), tmp_path, data=digits8(8)).fit()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "StudentScheduler"
    assert pipe.scheduler.config.timesteps == [999, 499]
    images = pipe(class_labels=[1, 2, 3], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (3, 8, 8, 1) and pipe.scheduler.num_inference_steps == 2


def test_bad_config_is_refused():
    from dstudio.distill.core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="critic_ratio=0 must be >= 1"):
        from_dict(DMD2Config, {"critic_ratio": 0})
    with pytest.raises(ConfigError, match="lr_generator=-1.0"):
        from_dict(DMD2Config, {"lr_generator": -1})
    assert from_dict(DMD2Config, {"lr_generator": "2e-4"}).lr_generator == 2e-4  # YAML 1.1 reads 2e-4 as text
    with pytest.raises(ConfigError, match="lr_generator='fast' must be a number"):
        from_dict(DMD2Config, {"lr_generator": "fast"})


def test_dmd2_on_a_tiny_text_pipeline(tiny_sd_dir, captioned_dir, tmp_path):
    """Text-conditioned DMD2 with CFG on the real score and the GAN on VAE latents of captioned images; the
    export is a StableDiffusionPipeline running the one-step scheduler."""
    from diffusers import StableDiffusionPipeline

    from dstudio.app.cli import main

    args = ["distill", "dmd2", "--teacher", str(tiny_sd_dir), "--data", str(captioned_dir), "--out", str(tmp_path / "run"),
            "--steps", "2", "--set", "trainer.batch_size=4", "--set", "trainer.sample_every=100",
            "--set", "method.critic_ratio=1", "--set", "method.guidance=3.0", "--set", "method.head_width=8"]
    assert main(args) == 0
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert "generator/gan_g" in log and "critic/gan_d" in log
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "StudentScheduler"
    images = pipe(["a red cat", "a dog"], guidance_scale=1.0, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and images.std() > 0 and pipe.scheduler.num_inference_steps == 1


def test_text_teachers_need_captions_or_prompts_and_a_method_that_takes_them(tiny_sd_dir, tmp_path, capsys):
    from dstudio.app.cli import main

    base = ["--teacher", str(tiny_sd_dir), "--steps", "1"]
    assert main(["distill", "dmd2", *base, "--data", "mnist", "--out", str(tmp_path / "a")]) == 2
    assert "has no captions" in capsys.readouterr().err
    assert main(["distill", "sim", *base, "--out", str(tmp_path / "b")]) == 2
    assert "needs prompts: give --prompts FILE" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    assert main(["distill", "slimflow", *base, "--prompts", str(tmp_path / "prompts.txt"), "--out",
                 str(tmp_path / "c")]) == 2
    assert "scale a pixel-space UNet2DModel teacher" in capsys.readouterr().err
    assert not any((tmp_path / n / "pipeline").exists() for n in "abc")


def test_gan_head_noise_levels_span_all_steps_and_differ_for_real_and_fake(dmd2):
    """DMD2's compute_cls_logits draws t ~ randint(0, T) inside each call: real and fake images get separate
    levels, over every step (the DMD loss alone keeps to [0.02 T, 0.98 T])."""
    seen = []
    dmd2.fake_score.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))
    real, labels = digits8(8).images[:300], digits8(8).labels[:300]
    torch.manual_seed(0)
    dmd2.critic_loss(Batch.of(real, labels), 0)
    assert len(seen) == 3  # DSM, then the head on the fake images, then on the real ones
    t_fake, t_real = (dmd2.schedule.sigma_to_t(s.double()).round().long() for s in seen[1:])
    assert not torch.equal(t_fake, t_real)
    T = dmd2.T
    for t in (t_fake, t_real):
        assert t.min() >= 0 and t.max() < T
        assert t.min() < 0.02 * T and t.max() >= 0.98 * T  # outside the DMD loss's range on both sides


def test_logit_normal_times_for_flow_teachers():
    """SD3's training times (Esser et al. 2024, eq. 19): u = sigmoid(N(0, 1)), kept in [lo, hi), as t = u (T - 1);
    the DMD loss draws them with method.t_dist=logit_normal (or auto, on flow-matching teachers)."""
    import math

    from dstudio.distill.core.score import sample_logit_normal_timesteps

    torch.manual_seed(0)
    t = sample_logit_normal_timesteps(20000, 1000, 0.02, 0.98)
    u = t / 999
    assert len(t) == 20000 and u.min() >= 0.02 and u.max() < 0.98
    assert abs(float(u.median()) - 0.5) < 0.01  # sigmoid of a median-0 normal
    inner = float(((u > 0.25) & (u < 0.75)).float().mean())  # P(|n| < logit(0.75)) / P(n in the kept range)
    z, lo = math.log(3), math.log(0.02 / 0.98)
    want = math.erf(z / math.sqrt(2)) / math.erf(-lo / math.sqrt(2))
    assert abs(inner - want) < 0.01
