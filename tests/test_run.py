"""prepare_run: the one place a run is assembled (config, folder, teacher, data, method, Trainer); its checks and
the checkpoint read happen once, before anything heavy is loaded."""
import pytest
import torch

from dstudio.distill.core import checkpoint
from dstudio.distill.core.checkpoint import RunExistsError
from dstudio.distill.core.errors import UserError
from dstudio.distill.core.run import RunRequest, prepare_run

TINY_DDPM = ["method.resolution=8", "method.channels=[8,16]", "trainer.batch_size=4", "trainer.sample_every=100",
             "trainer.log_every=1"]


def ddpm(out, **kw):
    """A tiny teacher-training run on sklearn's digits, from the config defaults."""
    return RunRequest("ddpm", out, preset=None, data="digits", overrides=TINY_DDPM, **kw)


def test_a_run_is_assembled_from_its_request(tmp_path):
    run = prepare_run(ddpm(tmp_path / "run", steps=2))
    assert run.config["method_name"] == "ddpm" and run.config["trainer"]["steps"] == 2
    assert run.config["method"]["data"] == "digits" and run.method.config.resolution == 8
    assert run.trainer.method is run.method and run.teacher is None and run.data.images.shape[-1] == 8
    assert run.out == tmp_path / "run" and not run.start.resume
    assert run.fit(export=False) is None and run.trainer.step == 2
    assert "method_name: ddpm" in (tmp_path / "run" / "config.yaml").read_text()


def test_checks_come_before_the_teacher_and_a_resume_reads_its_checkpoint_once(tiny_teacher, tmp_path, monkeypatch):
    import dstudio.distill.core.teacher as teacher_module

    out = tmp_path / "run"
    prepare_run(ddpm(out, steps=2)).fit(export=False)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the run folder was checked")

    with monkeypatch.context() as mp:
        mp.setattr(teacher_module, "load_teacher", no_teacher)
        with pytest.raises(RunExistsError, match="holds a run"):
            prepare_run(RunRequest("sim", out, str(tiny_teacher)))
        with pytest.raises(UserError, match="was made by method 'ddpm', not 'sim'"):
            prepare_run(RunRequest("sim", out, str(tiny_teacher), resume=True))
    reads = []
    read = checkpoint.read_checkpoint
    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda path: reads.append(path) or read(path))
    run = prepare_run(ddpm(out, steps=3, resume=True))
    assert len(reads) == 1 and run.start.state["step"] == 2 and run.start.changes == {"trainer.steps": (2, 3)}
    run.fit(export=False)
    assert len(reads) == 1 and run.trainer.step == 3


def test_a_loaded_teacher_and_images_are_taken_as_they_are(teacher, data, tmp_path):
    """What the memory benchmark does: a Teacher object and images already in its model space."""
    run = prepare_run(RunRequest("dmd2", tmp_path / "run", teacher, preset=None, data=data, steps=1,
                                 overrides=["method.head_width=8", "trainer.batch_size=4"]))
    assert run.teacher is teacher and run.data is data and run.config["teacher"] == teacher.source
    assert run.config["method"]["data"] == "digits"
    run.trainer.begin()
    assert run.method.context.steps == 1 and run.trainer.train_step() and torch.isfinite(
        torch.cat([p.flatten() for p in run.method.student.parameters()])).all()
