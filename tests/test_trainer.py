"""The one Trainer loop: phase isolation, update ratios, bit-for-bit resume, atomic checkpoints, export."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dstudio.distill.core.checkpoint import CHECKPOINT
from dstudio.distill.core.method import Method, Phase, RunContext, get_method
from dstudio.distill.core.trainer import DivergenceError, Trainer, TrainerConfig
from dstudio.distill.data import digits8
from dstudio.distill.methods.ddpm import DDPM, DDPMConfig


@dataclass
class ToyConfig:
    every_b: int = 2
    lr: float = 0.1
    nan_at: int = -1
    nan_grad_at: int = -1
    start_b: int = 0


class ToyTwoPhase(Method):
    """Two phases whose losses both depend on both networks, plus a frozen 'teacher' (not registered)."""

    name = "toy-two-phase"
    Config = ToyConfig
    needs_teacher = False
    is_distiller = False

    def __init__(self, config, teacher=None, data=None):
        super().__init__(config)
        self.student = nn.Linear(64, 4)
        self.critic = nn.Linear(4, 1)
        self.teacher = nn.Linear(64, 4).requires_grad_(False)
        self.calls = []

    def phases(self):
        return [Phase("critic", ("critic",), loss=self.critic_loss, lr=self.config.lr),
                Phase("student", ("student",), loss=self.student_loss, lr=self.config.lr, every=self.config.every_b,
                      start=self.config.start_b)]

    def on_start(self, context):
        self.calls.append(("fit", context.steps))

    def on_phase_start(self, phase, step):
        self.calls.append(("start", phase.name, step))

    def gap(self, batch, step):
        x = batch[0].flatten(1)
        out = self.critic(self.student(x) - self.teacher(x)).pow(2).mean()
        if step == self.config.nan_at:
            out = out * float("nan")
        if step == self.config.nan_grad_at:  # a finite loss (0) whose gradient is 0 * inf = nan
            out = out + (self.critic.weight * 0).abs().sqrt().sum()
        return out

    def critic_loss(self, batch, step):
        self.calls.append((step, "critic"))
        out = self.gap(batch, step)
        return out, {"v": out.item()}

    def student_loss(self, batch, step):
        self.calls.append((step, "student"))
        out = self.gap(batch, step)
        return -out, {"v": out.item()}

    def sample(self, labels, generator):
        return torch.tanh(self.student.weight[:, : labels.numel()].T.reshape(-1, 1, 2, 2))

    def export(self, path):
        torch.save(self.student.state_dict(), path)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_phases_touch_only_their_parameters(tmp_path):
    data = digits8(8)
    method = ToyTwoPhase(ToyConfig())
    trainer = Trainer(method, TrainerConfig(steps=1, batch_size=8), tmp_path, data=data)
    batch = trainer.stream.next("cpu")
    for phase, trained, frozen in ((trainer.phases[0], "critic", "student"), (trainer.phases[1], "student", "critic")):
        snaps = {n: _snapshot(getattr(method, n)) for n in ("student", "critic", "teacher")}
        method.train_only(phase)
        loss, _ = method(phase.name, batch, 0)
        loss.backward()
        assert all(p.grad is not None for p in getattr(method, trained).parameters())
        assert all(p.grad is None for n in (frozen, "teacher") for p in getattr(method, n).parameters())
        for p in getattr(method, trained).parameters():
            p.grad = None
        trainer.run_phase(phase, [batch])
        assert _changed(snaps[trained], getattr(method, trained))
        assert not _changed(snaps[frozen], getattr(method, frozen))
        assert not _changed(snaps["teacher"], method.teacher)


def test_the_method_is_given_its_run_explicitly(tmp_path):
    """begin() hands the method one RunContext (folder, accelerator, step budget, EMA): its averaged student reads
    the EMA it was given; the Trainer writes no other attribute of the method."""
    method = ToyTwoPhase(ToyConfig())
    with method.averaged_student() as net:  # no run yet: the live weights
        assert net is method.student and method.context is None
    trainer = Trainer(method, TrainerConfig(steps=3, batch_size=4), tmp_path, data=digits8(8))
    before = set(vars(method))
    trainer.begin()
    assert set(vars(method)) - before == {"context"} and method.calls == [("fit", 3)]
    assert method.context == RunContext(tmp_path, trainer.accelerator, 3, trainer.ema)
    with torch.no_grad():
        trainer.ema.shadow[0].add_(1.0)
    with method.averaged_student() as net:
        torch.testing.assert_close(net.weight, trainer.ema.shadow[0])
    assert trainer.train_step() and trainer.step == 1  # the public step: runs step 0, moves on


def test_update_ratio_is_honoured(tmp_path):
    method = ToyTwoPhase(ToyConfig(every_b=3))
    Trainer(method, TrainerConfig(steps=7, batch_size=4), tmp_path, data=digits8(8)).fit(export=False)
    assert [c[0] for c in method.calls if c[-1] == "critic"] == list(range(7))
    assert [c[0] for c in method.calls if c[-1] == "student"] == [0, 3, 6]


def test_hooks_run_at_the_fit_and_at_each_phase_start_but_not_again_on_resume(tmp_path):
    method = ToyTwoPhase(ToyConfig(start_b=3))
    Trainer(method, TrainerConfig(steps=5, batch_size=4, checkpoint_every=2), tmp_path, data=digits8(8)).fit(
        export=False)
    hooks = [c for c in method.calls if c[0] in ("fit", "start")]
    assert hooks == [("fit", 5), ("start", "critic", 0), ("start", "student", 3)]
    # a resume after step 4 starts inside both phases: on_start again (the run's new budget), no phase start
    resumed = ToyTwoPhase(ToyConfig(start_b=3))
    Trainer(resumed, TrainerConfig(steps=6, batch_size=4, checkpoint_every=2), tmp_path, data=digits8(8)).fit(
        resume=True, export=False)
    assert [c for c in resumed.calls if c[0] in ("fit", "start")] == [("fit", 6)]


def test_divergence_stops_with_step_phase_and_term(tmp_path):
    method = ToyTwoPhase(ToyConfig(nan_at=3))
    trainer = Trainer(method, TrainerConfig(steps=6, batch_size=4, checkpoint_every=2), tmp_path, data=digits8(8))
    with pytest.raises(DivergenceError, match=r"step 3, phase 'critic' \(v=nan\).*--resume"):
        trainer.fit(export=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 2


def test_non_finite_gradient_stops_the_run(tmp_path):
    method = ToyTwoPhase(ToyConfig(nan_grad_at=1))
    trainer = Trainer(method, TrainerConfig(steps=4, batch_size=4, checkpoint_every=1), tmp_path, data=digits8(8))
    with pytest.raises(DivergenceError, match=r"non-finite gradient at step 1, phase 'critic'"):
        trainer.fit(export=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 1


def test_stale_temp_files_of_a_killed_write_are_dropped(tmp_path):
    method, data = _tiny_ddpm()
    (tmp_path / f".{CHECKPOINT}.tmp-12345").write_bytes(b"half a checkpoint")
    Trainer(method, TrainerConfig(steps=1, batch_size=4), tmp_path, data=data).fit(export=False)
    assert not list(tmp_path.glob(".*tmp*")) and (tmp_path / CHECKPOINT).is_file()


def _tiny_ddpm(seed=0):
    torch.manual_seed(seed)
    data = digits8(8)
    return DDPM(DDPMConfig(data="digits", resolution=8, channels=(8, 16), grid_steps=2), data=data), data


def test_checkpoint_resume_continues_bit_for_bit(tmp_path):
    cfg = dict(batch_size=16, checkpoint_every=3, sample_every=100, seed=5)
    straight, data = _tiny_ddpm()
    Trainer(straight, TrainerConfig(steps=6, **cfg), tmp_path / "a", data=data).fit(export=False)

    first, data = _tiny_ddpm()
    Trainer(first, TrainerConfig(steps=3, **cfg), tmp_path / "b", data=data).fit(export=False)
    resumed, data = _tiny_ddpm(seed=123)  # different init: everything must come from the checkpoint
    trainer = Trainer(resumed, TrainerConfig(steps=6, **cfg), tmp_path / "b", data=data)
    trainer.fit(resume=True, export=False)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    ref = Trainer(straight, TrainerConfig(steps=6, **cfg), tmp_path / "a", data=data)
    ref.load_checkpoint()
    for a, b in zip(ref.ema.shadow, trainer.ema.shadow):
        assert torch.equal(a, b)


def test_resume_without_checkpoint_and_corrupt_checkpoint(tmp_path):
    method, data = _tiny_ddpm()
    trainer = Trainer(method, TrainerConfig(steps=2, batch_size=4), tmp_path, data=data)
    with pytest.raises(ValueError, match="no checkpoint.pt"):
        trainer.fit(resume=True)
    (tmp_path / CHECKPOINT).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt"):
        trainer.fit(resume=True)


def test_no_temporary_files_left(tmp_path):
    method, data = _tiny_ddpm()
    Trainer(method, TrainerConfig(steps=2, batch_size=4, sample_every=1, checkpoint_every=1), tmp_path,
            data=data).fit()
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    assert (tmp_path / "samples" / "step_000001.png").is_file() and (tmp_path / "config.yaml").is_file()


def test_export_loads_with_plain_diffusers(tiny_teacher):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_teacher, trust_remote_code=True)
    assert type(pipe).__name__ == "DStudioPipeline"
    out = pipe(class_labels=[0, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 8, 8, 1) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="class label 10"):
        pipe(class_labels=[10], num_inference_steps=1)


def test_registry_names_methods():
    assert get_method("ddpm") is DDPM
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_linear_warmup_per_phase(tmp_path):
    """trainer.warmup_steps: lr x min(1, (k + 1) / W) at the phase's k-th step (DMD2 warms up 500 steps, RF and
    SlimFlow 5k), counted from each phase's start; a function of the step alone, so resume needs no state."""
    ph = Phase("distill", ("student",), loss=None, lr=2.0, start=10)
    assert [ph.lr_at(s, 4) for s in (10, 11, 13, 20)] == [0.5, 1.0, 2.0, 2.0]
    assert ph.lr_at(10, 0) == 2.0
    method = ToyTwoPhase(ToyConfig(lr=0.1))
    trainer = Trainer(method, TrainerConfig(steps=3, batch_size=4, warmup_steps=4), tmp_path, data=digits8(8))
    trainer.fit(export=False)
    assert trainer.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(0.1 * 3 / 4)  # steps 0, 1, 2
    assert trainer.optimizers["student"].param_groups[0]["lr"] == pytest.approx(0.1 * 3 / 4)  # last ran at step 2
