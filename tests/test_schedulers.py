"""Scheduler classes against stock diffusers and against the pure samplers, on real diffusers objects."""
import pytest
import torch

from dstudio.distill.core.denoiser import DiscreteDenoiser, FlowDenoiser
from dstudio.samplers import (
    FlowEulerScheduler,
    SearchedScheduler,
    StudentScheduler,
    append_zero,
    sample_ddim,
    sample_dpmpp_2m,
    sample_flow_euler,
    sample_multistep,
    scheduler_from_teacher,
)


def run_loop(unet, scheduler, z, labels, generator=None, **set_kwargs):
    """The loop every diffusers pipeline runs."""
    scheduler.set_timesteps(device=z.device, **set_kwargs)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_uniform_ddim_rule_reproduces_ddimscheduler(teacher, spacing):
    from diffusers import DDIMScheduler

    z, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 4, 9])
    ddim = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing=spacing, set_alpha_to_one=True)
    ours = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timestep_spacing=spacing)
    with torch.no_grad():
        ref = run_loop(teacher.unet, ddim, z, labels, num_inference_steps=5)
        out = run_loop(teacher.unet, ours, z, labels, num_inference_steps=5)
    assert ours.timesteps.tolist() == ddim.timesteps.tolist()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver, pure", [("ddim", sample_ddim), ("dpmpp", sample_dpmpp_2m)])
def test_searched_scheduler_step_equals_pure_sampler(teacher, solver, pure):
    steps = [990, 700, 415, 180, 33]
    sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=steps, solver=solver)
    z, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 5])
    D = DiscreteDenoiser(teacher.unet, sched.alphas_cumprod, teacher.denoiser.prediction_type)
    sigmas = append_zero(D.t_to_sigma(torch.tensor(steps)))
    with torch.no_grad():
        via_scheduler = run_loop(teacher.unet, sched, z, labels)
        via_pure = pure(D, z.double() * (1 + sigmas[0] ** 2).sqrt(), sigmas, labels).float()
    torch.testing.assert_close(via_scheduler, via_pure, rtol=1e-4, atol=1e-4)


def test_student_scheduler_equals_multistep_sampler(teacher):
    sched = scheduler_from_teacher(StudentScheduler, teacher.scheduler)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    z, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2])
    D = DiscreteDenoiser(teacher.unet, sched.alphas_cumprod, teacher.denoiser.prediction_type)
    sigmas = append_zero(D.t_to_sigma(torch.tensor([999, 749, 499, 249])))
    with torch.no_grad():
        a = run_loop(teacher.unet, sched, z, labels, generator=torch.Generator().manual_seed(7), num_inference_steps=4)
        b = sample_multistep(D, z * (1 + sigmas[0] ** 2).sqrt().float(), sigmas, labels,
                             generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("noise_at_one", [False, True])
def test_flow_euler_scheduler_equals_pure_sampler(teacher, noise_at_one):
    unet = teacher.unet
    sched = FlowEulerScheduler(num_inference_steps=3, noise_at_one=noise_at_one)
    z, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 2])
    with torch.no_grad():
        a = run_loop(unet, sched, z, labels)
        b = sample_flow_euler(FlowDenoiser(unet, noise_at_one=noise_at_one), z, torch.tensor([0, 1 / 3, 2 / 3, 1.0]),
                              labels)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_round_trip_and_stored_list_is_the_default(tmp_path, teacher):
    sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=[999, 600, 250, 50], solver="dpmpp")
    sched.save_pretrained(tmp_path)
    back = SearchedScheduler.from_pretrained(tmp_path)
    assert back.config.timesteps == [999, 600, 250, 50] and back.config.solver == "dpmpp"
    back.set_timesteps(1000)  # DDPMPipeline's default count: the stored list still wins
    assert back.timesteps.tolist() == [999, 600, 250, 50]
    back.set_timesteps(timesteps=[900, 100])
    assert back.timesteps.tolist() == [900, 100]
    for cls in (StudentScheduler, FlowEulerScheduler):
        s = cls(timesteps=[0.0, 0.5] if cls is FlowEulerScheduler else [999, 499])
        s.save_pretrained(tmp_path / cls.__name__)
        assert cls.from_pretrained(tmp_path / cls.__name__).config.timesteps == s.config.timesteps


@pytest.mark.parametrize("kwargs, message", [
    ({"timesteps": [250, 750]}, "must be strictly decreasing"),
    ({"timesteps": [500, 500]}, "must be strictly decreasing"),
    ({"timesteps": [1000, 10]}, "timestep 1000 is outside \\[0, 1000\\)"),
    ({"timesteps": [-1]}, "timestep -1 is outside"),
    ({"timesteps": []}, "timesteps is empty"),
    ({"prediction_type": "x0"}, "prediction_type 'x0' is not supported"),
    ({"solver": "rk4"}, "solver 'rk4' is not one of ddim, dpmpp"),
])
def test_bad_schedules_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchedScheduler(**kwargs)


def test_pipelines_use_the_schedulers(teacher, tmp_path):
    """The teacher's own pipeline, a stock DDPMPipeline and an export that records the scheduler."""
    from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel

    from dstudio.distill.core.export import export_image_pipeline

    sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=[999, 500, 100])
    pipe = teacher.pipeline
    old = pipe.scheduler
    pipe.scheduler = sched
    try:
        out = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    finally:
        pipe.scheduler = old
    assert out.shape == (2, 1, 8, 8) and sched.num_inference_steps == 3

    uncond = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                         up_block_types=("UpBlock2D",) * 2)
    stock = DDPMPipeline(unet=uncond, scheduler=sched)
    img = stock(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (2, 8, 8, 1) and sched.num_inference_steps == 3

    folder = export_image_pipeline(teacher.unet, sched, tmp_path / "export")
    assert '"SearchedScheduler"' in (folder / "model_index.json").read_text()
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded.scheduler).__name__ == "SearchedScheduler"
    assert loaded.scheduler.config.timesteps == [999, 500, 100]


def test_text_pipeline_with_each_scheduler(tmp_path):
    from tiny_sd import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    for sched, kw in (
        (scheduler_from_teacher(SearchedScheduler, pipe.scheduler, solver="dpmpp"), {"timesteps": [999, 500, 20]}),
        (scheduler_from_teacher(StudentScheduler, pipe.scheduler), {"timesteps": [999, 499]}),
        (FlowEulerScheduler(), {"timesteps": [0, 500]}),
    ):
        pipe.scheduler = sched
        out = pipe(["a red cat"], generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
        assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
        assert sched.num_inference_steps == len(kw["timesteps"])


def test_readme_snippet_and_scheduler_dir(teacher, tiny_teacher, tmp_path):
    """README: `pipe.scheduler = SearchedScheduler.from_pretrained(dir)`, and `dstudio sample --scheduler-dir`."""
    from dstudio.app.cli import main

    scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=[999, 400]).save_pretrained(tmp_path / "s")
    pipe = teacher.pipeline
    old = pipe.scheduler
    pipe.scheduler = SearchedScheduler.from_pretrained(tmp_path / "s")
    try:
        images = pipe(class_labels=[7], generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.scheduler = old
    assert len(images) == 1 and images[0].size == (8, 8)
    assert main(["sample", "--pipeline", str(tiny_teacher), "--scheduler-dir", str(tmp_path / "s"),
                 "--num-images", "2", "--out", str(tmp_path / "o")]) == 0
    import json

    assert json.loads((tmp_path / "o" / "samples.json").read_text())["scheduler"] == "SearchedScheduler"
    assert main(["sample", "--pipeline", str(tiny_teacher), "--scheduler-dir", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "p")]) == 2
