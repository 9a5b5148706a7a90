"""The teacher zoo: teachers dstudio did not make (DDPMPipeline folders, eps / v / x0 / flow matching, clip_sample,
zero terminal SNR, unconditional) load by components, and every method distils every one of them into a student
whose exported pipeline plain diffusers runs, drawing what the method itself draws."""
import json

import pytest
import torch

from conftest import ZOO
from dstudio.distill.core.denoiser import ClippedDenoiser, FlowMatchDenoiser, start_noise
from dstudio.distill.core.images import collapse_reason
from dstudio.distill.core.method import discover
from dstudio.distill.core.teacher import TeacherError, load_teacher
from dstudio.distill.core.trainer import Trainer, TrainerConfig
from dstudio.distill.data import digits8
from dstudio.distill.methods.ddpm import DDPM, DDPMConfig

METHODS = {  # name: (config overrides, trainer steps) so that every phase runs at least once; others: defaults, 2
    "dmd2": (dict(data="digits", critic_ratio=1, lr_generator=1e-3, lr_critic=1e-3, head_width=8), 2),
    "msd": (dict(data="digits", students=2, student_width=0.5, tsm_steps=1, critic_ratio=1, head_width=8), 2),
    "sim": (dict(lr_generator=1e-3, lr_fake=1e-3), 2),
    "rectified_flow": (dict(num_pairs=8, shard_size=8, solver_steps=2, reflow_steps=1, perceptual="none"), 2),
    "slimflow": (dict(num_pairs=8, shard_size=8, solver_steps=2, reflow_steps=1, perceptual="none"), 2),
    "consistency": (dict(data="digits", s0=2, s1=4), 2),
}


def test_zoo_folders_are_diffusers_ddpm_pipelines(zoo):
    from diffusers import DDPMPipeline

    for name, folder in zoo.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"], name
    flow = json.loads((zoo["flow"] / "scheduler" / "scheduler_config.json").read_text())
    assert flow["_class_name"] == "FlowMatchEulerDiscreteScheduler" and flow["shift"] == 2.0
    # an unconditional folder runs in diffusers' own DDPMPipeline
    images = DDPMPipeline.from_pretrained(zoo["eps-uncond"])(batch_size=2, num_inference_steps=2,
                                                             output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_teachers_load_by_components(zoo):
    kinds = {name: load_teacher(folder) for name, folder in zoo.items()}
    assert not kinds["eps-cosine-clip"].takes_prompts and kinds["eps-cosine-clip"].num_classes == 10
    assert kinds["eps-cosine-clip"].clipping == {"clip_range": 1.0}
    assert isinstance(kinds["eps-cosine-clip"].for_sampling(), ClippedDenoiser)
    uncond = kinds["eps-uncond"]
    assert uncond.num_classes == 0 and uncond.null_cond is None and uncond.clipping is None
    assert isinstance(kinds["flow"].denoiser, FlowMatchDenoiser)
    assert kinds["v-zero-snr"].denoiser.sigma_max > 1e3  # alphabar_T = 2^-24: pure noise at the last step


@pytest.mark.parametrize("name", [*ZOO, "shipped"])
def test_exported_schedulers_and_the_denoiser_share_one_noise_schedule(zoo, name):
    """The denoiser reads the teacher scheduler's alphas_cumprod; each exported scheduler rebuilds them from the
    config (diffusers' betas, or the flow-matching grid): both give the same sigma at every training step (bit for
    bit; to float32 rounding where diffusers rescaled the betas to zero terminal SNR and the export carries them as
    trained_betas), and the time input a scheduler feeds the model at a noise level is the denoiser's c_noise."""
    from dstudio.samplers import FlowEulerScheduler, SearchedScheduler, StudentScheduler, scheduler_from_teacher

    teacher = load_teacher(None if name == "shipped" else zoo[name])
    d = teacher.denoiser
    steps = [teacher.num_train_timesteps - 1, 500, 37, 0]
    sigmas = d.t_to_sigma(torch.tensor(steps, dtype=torch.float64))
    rtol = 1e-5 if teacher.scheduler.config.get("rescale_betas_zero_snr") else 0.0
    for cls in (StudentScheduler, SearchedScheduler, FlowEulerScheduler):
        own = {"prediction_type": d.prediction_type} if cls is FlowEulerScheduler else {}  # the flow students'
        sched = scheduler_from_teacher(cls, teacher.scheduler, **own)
        if sched.schedule is not None:  # a discrete schedule (all but a flow teacher's velocity Euler)
            torch.testing.assert_close(sched.schedule.sigmas, d.schedule.sigmas, rtol=rtol, atol=0)
        if cls is FlowEulerScheduler:
            sched.set_timesteps(sigmas=sigmas.tolist())
        else:
            sched.set_timesteps(timesteps=steps)
        torch.testing.assert_close(sched.timesteps.double(), d.c_noise(sigmas).double(), rtol=1e-5, atol=1e-3,
                                   msg=f"{name}, {cls.__name__}")


def test_sample_cli_on_a_class_conditional_ddpm_pipeline_folder(zoo, tmp_path):
    """The issue's case: a class-conditional UNet saved as DDPMPipeline, which DDPMPipeline itself cannot call."""
    from dstudio.app.cli import main

    for name in ("eps-cosine-clip", "flow"):
        assert main(["sample", "--teacher", str(zoo[name]), "--steps", "2", "--num-images", "3", "--class", "7",
                     "--guidance", "2", "--out", str(tmp_path / name)]) == 0
        assert len(list((tmp_path / name).glob("*.png"))) == 3


def test_components_dstudio_cannot_use_are_named(zoo, tmp_path):
    import shutil

    folder = shutil.copytree(zoo["eps-uncond"], tmp_path / "ldm")
    index = json.loads((folder / "model_index.json").read_text())
    index["vqvae"] = ["diffusers", "VQModel"]
    (folder / "vqvae").mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match="component 'vqvae' of .* is diffusers.VQModel, which dstudio cannot use"):
        load_teacher(folder)
    index.pop("vqvae")
    index["unet"] = ["diffusers", "SD3Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match="component 'unet' .*SD3Transformer2DModel, which dstudio cannot use"):
        load_teacher(folder)


def test_flow_match_denoiser_matches_the_diffusers_euler_step(zoo):
    """x0 = x_s - s u is where FlowMatchEulerDiscreteScheduler's Euler step to s' = 0 lands, at every s."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = load_teacher(zoo["flow"])
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(zoo["flow"] / "scheduler")
    x_s = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([3, 4])
    for s_wanted in (0.5, 0.04, 1.0):
        sched.set_timesteps(sigmas=[s_wanted], device="cpu")  # one step: s -> 0
        s, t = float(sched.sigmas[0]), sched.timesteps[0]
        u = teacher.unet(x_s, t, class_labels=labels).sample
        ref = sched.step(u, t, x_s).prev_sample
        # s = 1 (pure noise) is read at the largest finite sigma (1e5): s = 1 - 1e-5
        sigma = min(s / (1 - s), teacher.denoiser.sigma_max) if s < 1 else teacher.denoiser.sigma_max
        x0 = teacher.denoiser(x_s * (1 + sigma), torch.tensor(sigma), labels)
        torch.testing.assert_close(x0, ref, atol=1e-3 if s == 1 else 1e-5, rtol=0)


def test_clipping_and_noise_scale():
    from dstudio.distill.core.denoiser import DiscreteDenoiser

    class Wild(torch.nn.Module):
        def forward(self, x, sigma, cond=None):
            return x * 5

    clipped = ClippedDenoiser(Wild(), clip_range=1.0)
    assert clipped(torch.ones(1, 1, 2, 2), 1.0).max() == 1.0
    thr = ClippedDenoiser(Wild(), threshold_ratio=0.5, max_value=2.0)
    assert thr(torch.ones(1, 1, 2, 2), 1.0).max() == 1.0  # clip to s = 2, divide by s
    unet = torch.nn.Identity()
    d = DiscreteDenoiser(unet, torch.linspace(0.99, 1e-9, 10), "epsilon")
    assert d.student(unet).prediction_type == "epsilon"  # students keep their teacher's parameterisation
    x = start_noise(d, (4, 1, 8, 8), d.sigma_max, torch.Generator().manual_seed(0))
    assert x.std() > 0.5 * d.sigma_max  # unit noise on the VE scale at the terminal sigma


def test_collapse_reason():
    assert "saturated" in collapse_reason(torch.randn(8, 1, 8, 8).sign())
    assert "constant" in collapse_reason(torch.zeros(8, 1, 8, 8) + 0.3)
    assert collapse_reason(digits8(8).images[:64]) is None


def test_trainer_warns_when_samples_collapse(data, tmp_path, capsys):
    torch.manual_seed(0)
    method = DDPM(DDPMConfig(data="digits", resolution=8, channels=(8, 16), grid_steps=1), data=data)
    method.sample = lambda labels, generator: torch.randn(len(labels), 1, 8, 8, generator=generator).sign()
    trainer = Trainer(method, TrainerConfig(steps=2, batch_size=4, sample_every=1, checkpoint_every=100,
                                            grid_per_class=1), tmp_path, data=data)
    trainer.fit()
    assert [w.split(":")[0] for w in trainer.collapse_warnings] == ["step 1", "step 2", "step 2"]  # + the final grid
    err = capsys.readouterr().err
    assert "step 1: the student's samples look collapsed (saturated" in err and "collapsed samples at step 1" in err


def _make(method_name, teacher, data):
    from dstudio.distill.core.config import from_dict
    from dstudio.distill.core.method import get_method

    cls = get_method(method_name)
    overrides, steps = METHODS.get(method_name, ({}, 2))
    torch.manual_seed(0)
    method = cls(from_dict(cls.Config, overrides), teacher=teacher, data=data if cls.needs_data else None)
    return method, steps


@pytest.mark.parametrize("teacher_name", list(ZOO))
@pytest.mark.parametrize("method_name", sorted(n for n, c in discover().items() if c.is_distiller))
def test_every_method_on_every_zoo_teacher(method_name, teacher_name, zoo, data, tmp_path):
    from diffusers import DiffusionPipeline

    teacher = load_teacher(zoo[teacher_name])
    if method_name == "msd" and not teacher.num_classes:
        from dstudio.distill.core.config import ConfigError

        with pytest.raises(ConfigError, match="msd needs a class-conditional teacher"):
            _make(method_name, teacher, data)
        return
    method, steps = _make(method_name, teacher, data)
    trainer = Trainer(method, TrainerConfig(steps=steps, batch_size=8, sample_every=100, checkpoint_every=100,
                                            log_every=1), tmp_path / "run", data=data if method.needs_data else None)
    out = trainer.fit()
    log = (tmp_path / "run" / "log.jsonl").read_text()
    for phase in trainer.phases:
        assert f'"{phase.name}/' in log, phase.name  # every phase ran

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    labels = torch.tensor([1, 5, 9]) if teacher.num_classes else torch.zeros(3, dtype=torch.long)
    images = pipe(batch_size=3, class_labels=labels if teacher.num_classes else None, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1
    # the export reads the student as the method does: same noise, same one-step images
    with torch.no_grad(), trainer.ema.applied(method.student_net()):
        method.eval()
        ref = method.sample(labels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(images * 2 - 1, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("teacher_name", ["eps-cosine-clip", "flow"])
def test_distill_cli_evaluates_a_zoo_teacher(teacher_name, zoo, tmp_path, capsys):
    """`dstudio distill dmd2 --teacher DDPMPipeline-folder` trains, exports and evaluates (the issue's TypeError)."""
    from dstudio.app.cli import main

    run = tmp_path / "run"
    assert main(["distill", "dmd2", "--teacher", str(zoo[teacher_name]), "--data", "digits", "--steps", "1",
                 "--eval-per-class", "2", "--out", str(run), "--set", "trainer.batch_size=4",
                 "--set", "trainer.sample_every=1", "--set", "method.head_width=8"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["teacher", "student"] and "collapse_warnings" in result
    assert (run / "samples" / "step_000001.png").is_file()
