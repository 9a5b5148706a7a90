"""LoRA students: adapters over the teacher's own weights, trained alone, exported fused and as a diffusers LoRA."""
import pytest
import torch
from test_exports import LABELS, _fit, _reference, assert_same_images, plain_diffusers

from dstudio.distill.core.config import ConfigError, from_dict
from dstudio.distill.core.lora import AdapterView, _base_key
from dstudio.distill.core.teacher import load_teacher
from dstudio.distill.data import digits8


def _frozen(unet) -> dict:
    """The teacher's own weights, by their plain names (its adapters left out)."""
    return {k2: v.detach().clone() for k, v in unet.state_dict().items() if (k2 := _base_key(k)) is not None}


def _check_adapters_only(trainer, teacher, base_before, adapters_before):
    m = trainer.method
    after = _frozen(teacher.unet)
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in after), "the shared teacher weights changed"
    views = [v for v in m.modules() if isinstance(v, AdapterView)]
    assert views
    for view in views:  # every trained adapter moved, and only adapter tensors are its parameters
        assert all(".lora_" in k for k in view.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(adapters_before, m.student_net().parameters()))
    optimised = {id(p) for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"]}
    base_ids = {id(p) for n, p in teacher.unet.named_parameters() if ".lora_" not in n}
    assert not optimised & base_ids
    adapter_ids = {id(p) for p in m.student_net().parameters()}
    assert len(trainer.ema.shadow) == len(adapter_ids)
    state = torch.load(trainer.run_dir / "checkpoint.pt", weights_only=True)
    for name, sd in state["modules"].items():  # adapters (and the GAN head) only; they load back (--resume)
        lora = any(isinstance(x, AdapterView) for x in getattr(m, name).modules())
        assert lora == all(".lora_" in k for k in sd), name
        getattr(m, name).load_state_dict(sd)
    assert {"student", "fake_score"} & state["modules"].keys()


@pytest.fixture
def fresh_teacher(tiny_teacher):
    return load_teacher(tiny_teacher)  # LoRA adapts the teacher object it is given: one per test


def test_lora_dmd2_trains_adapters_over_the_frozen_teacher(fresh_teacher, tmp_path):
    from dstudio.distill.methods.dmd2 import DMD2, DMD2Config

    teacher = fresh_teacher
    base_before = _frozen(teacher.unet)
    x, t, labels = torch.randn(4, *teacher.sample_shape), torch.tensor([5, 50, 500, 900]), torch.tensor(LABELS)
    with torch.no_grad():
        teacher_out = teacher.unet(x, t, class_labels=labels).sample
    torch.manual_seed(0)
    m = DMD2(DMD2Config(data="digits", critic_ratio=1, head_width=8, lr_generator=1e-3, lr_critic=1e-3,
                        lora_rank=4, lora_alpha=8.0), teacher=teacher, data=digits8(8))
    assert isinstance(m.student.model, AdapterView) and isinstance(m.fake_score.model, AdapterView)
    assert m.student.model.base is teacher.unet is m.fake_score.model.base  # one copy of the backbone
    adapters_before = [p.detach().clone() for p in m.student_net().parameters()]
    trainer, folder = _fit(m, tmp_path / "run", steps=2)
    _check_adapters_only(trainer, teacher, base_before, adapters_before)
    with torch.no_grad():  # the teacher's calls run with every adapter off: bit-identical to before training
        assert torch.equal(teacher.unet(x, t, class_labels=labels).sample, teacher_out)
        assert not torch.equal(m.student.model(x, t, class_labels=labels).sample, teacher_out)
    got = plain_diffusers(tmp_path, folder, (0, {"class_labels": LABELS}))  # the fused export, in plain diffusers
    assert_same_images(got["images"][0], _reference(trainer))
    assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_lora_student_beside_a_full_fake_score(fresh_teacher, tmp_path):
    """`lora_fake_score=False` (DMD2's own LoRA recipe): the student is an adapter over the teacher's weights, the
    fake score a full trainable copy; both train, the shared base does not change."""
    from dstudio.distill.methods.dmd2 import DMD2, DMD2Config

    teacher = fresh_teacher
    base_before = _frozen(teacher.unet)
    torch.manual_seed(0)
    m = DMD2(DMD2Config(data="digits", critic_ratio=1, head_width=8, lora_rank=4, lora_fake_score=False),
             teacher=teacher, data=digits8(8))
    assert isinstance(m.student.model, AdapterView) and not isinstance(m.fake_score.model, AdapterView)
    assert m.fake_score.model is not teacher.unet and not any(".lora_" in k for k in m.fake_score.model.state_dict())
    fake_before = [p.detach().clone() for p in m.fake_score.model.parameters()]
    adapters_before = [p.detach().clone() for p in m.student_net().parameters()]
    trainer, _ = _fit(m, tmp_path / "run", steps=2)
    after = _frozen(teacher.unet)
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)
    assert any(not torch.equal(a, b) for a, b in zip(adapters_before, m.student_net().parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, m.fake_score.model.parameters()))


def test_lora_plus_trains_b_at_ratio_times_the_rate_of_a(fresh_teacher, tmp_path):
    """LoRA+ (Hayou et al. 2024): B in its own optimiser group at `lora_plus_ratio` x the phase's rate. Adam's first
    step moves every parameter with a gradient by its lr, and at B = 0 only B has one: |B| = ratio x lr (the fake
    score's, whose denoising loss has a gradient at step 0; the student's distribution matching has none yet)."""
    from dstudio.distill.methods.dmd2 import DMD2, DMD2Config

    torch.manual_seed(0)
    lr, ratio = 1e-3, 16.0
    m = DMD2(DMD2Config(data="digits", critic_ratio=1, head_width=8, lr_generator=lr, lr_critic=lr, gan=False,
                        weight_decay=0.0, lora_rank=4, lora_plus_ratio=ratio), teacher=fresh_teacher, data=digits8(8))
    fake = m.fake_score.model
    a_before = {n: p.detach().clone() for n, p in fake.named_parameters() if "lora_A" in n}
    trainer, _ = _fit(m, tmp_path / "run", steps=1)
    for phase, view in (("critic", fake), ("generator", m.student.model)):
        groups = trainer.optimizers[phase].param_groups
        b_ids = {id(p) for n, p in view.named_parameters() if "lora_B" in n}
        assert [g["lr_scale"] for g in groups if {id(p) for p in g["params"]} >= b_ids] == [ratio]
        assert not any(b_ids & {id(p) for p in g["params"]} for g in groups if g["lr_scale"] != ratio)
        assert all(g["lr"] == pytest.approx(lr * g["lr_scale"]) for g in groups)
    b = torch.cat([p.detach().flatten() for n, p in fake.named_parameters() if "lora_B" in n])
    assert b.abs().max().item() == pytest.approx(ratio * lr, rel=1e-3)
    assert all(torch.equal(p, a_before[n]) for n, p in fake.named_parameters() if "lora_A" in n)


def test_lora_rectified_flow(fresh_teacher, tmp_path):
    from dstudio.distill.methods.rectified_flow import RectifiedFlow

    teacher = fresh_teacher
    base_before = _frozen(teacher.unet)
    torch.manual_seed(0)
    cfg = {"num_pairs": 8, "shard_size": 8, "solver_steps": 2, "reflow_steps": 1, "perceptual": "none", "lora_rank": 2,
           "distill_pairs": "teacher",
           "lora_targets": ["to_q", "to_v", "conv2"]}
    m = RectifiedFlow(from_dict(RectifiedFlow.Config, cfg), teacher=teacher)
    adapters_before = [p.detach().clone() for p in m.student_net().parameters()]
    trainer, folder = _fit(m, tmp_path / "run", steps=2, grid_per_class=1)
    _check_adapters_only(trainer, teacher, base_before, adapters_before)
    assert {k.split(".")[1].split("__")[-1] for k in m.student.model.state_dict()} == {"to_q", "to_v", "conv2"}
    got = plain_diffusers(tmp_path, folder, (1, {"class_labels": LABELS}))
    assert_same_images(got["images"][0], _reference(trainer, seed=1, steps=1))


def test_lora_file_loads_into_the_teachers_sd_pipeline(tiny_sd_dir, captioned_dir, tmp_path):
    """The exported LoRA on the teacher's own StableDiffusionPipeline (load_lora_weights) with the student's
    scheduler draws the fused student's images."""
    from diffusers import StableDiffusionPipeline

    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import image_folder
    from dstudio.distill.methods.dmd2 import DMD2, DMD2Config

    teacher = load_teacher(tiny_sd_dir)
    data = teacher.to_model_space(image_folder(captioned_dir, resolution=16, channels=3))
    torch.manual_seed(0)
    m = DMD2(DMD2Config(critic_ratio=1, head_width=8, lr_generator=1e-2, lr_critic=1e-2, lora_rank=4, lora_alpha=2.0),
             teacher=teacher, data=data)
    folder = Trainer(m, TrainerConfig(steps=2, batch_size=4, sample_every=100), tmp_path / "run", data=data).fit()
    prompts = [data.captions[0], data.captions[2]]

    def images(pipe):
        return pipe(prompts, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt").images

    fused = StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    bare = images(StableDiffusionPipeline.from_pretrained(tiny_sd_dir, scheduler=fused.scheduler))
    pipe.scheduler = fused.scheduler
    pipe.load_lora_weights(folder / "lora")
    want = images(fused)
    torch.testing.assert_close(images(pipe), want, atol=1e-4, rtol=0)
    assert (bare - want).abs().max() > 1e-3  # the adapter is what makes the student


@pytest.mark.parametrize("method,cfg,needle", [
    ("consistency", {"lora_rank": 4}, "--init teacher"),
    ("rectified_flow", {"lora_rank": 4, "init": "scratch"}, "--init teacher"),
    ("msd", {"lora_rank": 4, "student_width": 0.5}, "full-width"),
])
def test_lora_refused_where_there_is_no_teacher_copy(fresh_teacher, method, cfg, needle):
    from dstudio.distill.core.method import get_method

    cls = get_method(method)
    with pytest.raises(ConfigError, match=needle):
        cls(from_dict(cls.Config, {**({"data": "digits"} if "data" in cls.Config.__dataclass_fields__ else {}), **cfg}),
            teacher=fresh_teacher, data=digits8(8))


def test_lora_options_checked(capsys):
    from dstudio.app.cli import main
    from dstudio.distill.methods.dmd2 import DMD2Config

    with pytest.raises(ConfigError, match="lora_rank"):
        from_dict(DMD2Config, {"lora_rank": -1})
    with pytest.raises(ConfigError, match="lora_alpha"):
        from_dict(DMD2Config, {"lora_rank": 4, "lora_alpha": 0})
    with pytest.raises(ConfigError, match="lora_plus_ratio=0"):
        from_dict(DMD2Config, {"lora_rank": 4, "lora_plus_ratio": 0})
    assert main(["distill", "slimflow", "--lora-rank", "4"]) == 2
    assert "--lora-rank does not apply to method 'slimflow'" in capsys.readouterr().err
