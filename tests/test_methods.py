"""The method registry: methods are discovered (the core names none), and a new method is one new file."""
import contextlib
import subprocess
import sys
import textwrap

import pytest

from dstudio.app.cli import main
from dstudio.distill.core import method as registry
from dstudio.distill.core.method import Batch

# A whole method in one file: a one-step student regressed onto the teacher's denoising of pure noise.
TOY = '''
"""A throwaway one-step method (a test's)."""
from dataclasses import dataclass, field

import torch

from dstudio.distill.core.denoiser import start_noise
from dstudio.distill.core.export import export_image_pipeline
from dstudio.distill.core.method import Method, Phase, register
from dstudio.distill.core.score import trainable_copy
from dstudio.samplers import StudentScheduler, scheduler_from_teacher


@dataclass
class ToyConfig:
    lr: float = field(default=1e-4, metadata={"cli": "--toy-lr", "help": "the student's learning rate"})


@register("toy_one_step")
class ToyOneStep(Method):
    """A student that matches the teacher's x0 from pure noise in one step."""

    Config = ToyConfig
    needs_data = False

    def __init__(self, config, teacher=None, data=None):
        super().__init__(config)
        self.teacher_denoiser, self.teacher_scheduler = teacher.denoiser, teacher.scheduler
        self.num_classes, self.shape = teacher.num_classes, teacher.sample_shape
        self.student = teacher.denoiser.student(trainable_copy(teacher.unet))
        self.t = teacher.num_train_timesteps - 1
        self.sigma = float(teacher.denoiser.t_to_sigma(torch.tensor(self.t)))

    def phases(self):
        return [Phase("student", ("student",), loss=self.student_loss, lr=self.config.lr)]

    def student_loss(self, batch, step):
        """Regression of the one-step student onto the teacher's x0 from pure noise (a test's)."""
        labels = torch.randint(0, self.num_classes, (batch.size,))
        x = start_noise(self.student, (batch.size, *self.shape), self.sigma)
        with torch.no_grad():
            target = self.teacher_denoiser(x, torch.tensor(self.sigma), labels)
        loss = (self.student(x, torch.tensor(self.sigma), labels) - target).pow(2).mean()
        return loss, {"mse": loss.item()}

    def sample(self, labels, generator):
        x = start_noise(self.student, (len(labels), *self.shape), self.sigma, generator)
        return self.student(x, torch.tensor(self.sigma), labels).clamp(-1, 1)

    def export(self, path):
        sched = scheduler_from_teacher(StudentScheduler, self.teacher_scheduler, timesteps=[self.t],
                                       prediction_type=self.student.prediction_type)
        export_image_pipeline(self.student.model, sched, path, method=self.name)
'''


@contextlib.contextmanager
def plugin_package(tmp_path, monkeypatch, name="toy_methods", files=None, env=True):
    """A package of method files on sys.path, named by $DSTUDIO_METHODS (with `env`); the registry and sys.modules
    are restored afterwards, so nothing it registers outlives the block."""
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for file, text in (files or {}).items():
        (pkg / file).write_text(textwrap.dedent(text))
    registry.discover()  # the built-in methods, registered before the snapshot
    saved = dict(registry.METHODS), dict(registry.ALIASES)
    monkeypatch.syspath_prepend(str(tmp_path))
    if env:
        monkeypatch.setenv(registry.ENV_VAR, name)
    try:
        yield pkg
    finally:
        monkeypatch.delenv(registry.ENV_VAR, raising=False)
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
        registry.METHODS.clear(), registry.METHODS.update(saved[0])
        registry.ALIASES.clear(), registry.ALIASES.update(saved[1])


def test_a_method_is_one_file(tiny_teacher, tmp_path, monkeypatch, capsys):
    """The acceptance test of issue 20: one file in a package, no YAML, no CLI edit; its flag comes from its config."""
    run = tmp_path / "run"
    with plugin_package(tmp_path, monkeypatch, files={"toy.py": TOY}):
        assert main(["methods"]) == 0
        assert "toy_one_step\tA student that matches" in capsys.readouterr().out
        args = ["distill", "toy_one_step", "--teacher", str(tiny_teacher), "--steps", "2", "--out", str(run),
                "--eval-per-class", "0", "--toy-lr", "2e-4", "--set", "trainer.batch_size=4",
                "--set", "trainer.sample_every=100"]
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "toy_one_step has no presets in configs/: 'quick' means its config defaults" in err
        assert "lr: 0.0002" in (run / "config.yaml").read_text()
        assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        # a flag of another method does not apply to it
        assert main(["distill", "toy_one_step", "--teacher", str(tiny_teacher), "--students", "2",
                     "--out", str(tmp_path / "other")]) == 2
        assert "--students does not apply to method 'toy_one_step'" in capsys.readouterr().err
    assert "toy_one_step" not in registry.discover()  # nothing left in the global registry
    assert main(["distill", "toy_one_step", "--out", str(tmp_path / "gone")]) == 2
    assert "unknown method 'toy_one_step'" in capsys.readouterr().err


def test_an_entry_point_names_a_method_package(tmp_path, monkeypatch):
    """Third-party packages declare `[project.entry-points."dstudio.methods"]`; simulated here."""
    import importlib.metadata

    ep = importlib.metadata.EntryPoint(name="toys", value="toy_ep_methods", group=registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    with monkeypatch.context() as mp, plugin_package(tmp_path, mp, name="toy_ep_methods", files={"toy.py": TOY},
                                                     env=False):
        mp.setattr(importlib.metadata, "entry_points",
                   lambda **kw: [ep] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw))
        assert "toy_ep_methods" in registry.method_sources()
        assert registry.get_method("toy_one_step").__module__ == "toy_ep_methods.toy"
    assert "toy_one_step" not in registry.discover()


def test_files_starting_with_underscore_hold_no_methods(tmp_path, monkeypatch):
    shared = "from dstudio.distill.core.method import register\nraise RuntimeError('imported')\n"
    with plugin_package(tmp_path, monkeypatch, files={"_shared.py": shared}):
        registry.discover()  # _shared.py is not imported


BROKEN = {  # a method plugin that raises on import, by the exception it raises
    "RuntimeError": "raise RuntimeError('boom')",
    "ModuleNotFoundError": "import no_such_dependency_of_a_plugin",
    "SyntaxError": "def (",
    "SystemExit": "import sys\nsys.exit('gone')",
}


@pytest.mark.parametrize("error", list(BROKEN))
def test_a_broken_plugin_is_listed_and_affects_nothing_else(error, tiny_teacher, tmp_path, monkeypatch, capsys):
    """$DSTUDIO_METHODS names a broken plugin before a working one: `dstudio methods` lists it with its one-line
    error; sample, fid and distill of the other plugin's method work; distilling with it is a one-line error."""
    broken_files = {"bad.py": f"from dstudio.distill.core.method import register\n{BROKEN[error]}\n"}
    with plugin_package(tmp_path, monkeypatch, "broken_methods", broken_files, env=False), \
            plugin_package(tmp_path, monkeypatch, files={"toy.py": TOY}, env=False):
        monkeypatch.setenv(registry.ENV_VAR, "broken_methods,toy_methods")
        assert main(["methods"]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert any(line.startswith("toy_one_step\t") for line in listed) and "dmd2" in registry.METHODS
        assert [line for line in listed if line.startswith("broken_methods\t")] == \
            [f"broken_methods\tplugin not loaded: {registry.BROKEN['broken_methods']}"]
        assert registry.BROKEN["broken_methods"].startswith(error)
        samples = tmp_path / "samples"
        assert main(["sample", "--teacher", str(tiny_teacher), "--steps", "1", "--num-images", "2",
                     "--out", str(samples)]) == 0
        assert main(["fid", "--images", str(samples), "--ref", str(samples), "--features", "pixels"]) == 0
        assert main(["distill", "toy_one_step", "--teacher", str(tiny_teacher), "--steps", "1", "--out",
                     str(tmp_path / "run"), "--eval-per-class", "0", "--set", "trainer.batch_size=4",
                     "--set", "trainer.sample_every=100"]) == 0
        capsys.readouterr()
        assert main(["distill", "bad", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dstudio: error: unknown method 'bad': use one of "), err
        assert f"method plugin 'broken_methods' did not import ({error}" in err[0]


def test_a_broken_entry_point_is_listed(tmp_path, monkeypatch, capsys):
    import importlib.metadata

    ep = importlib.metadata.EntryPoint(name="gone", value="no_such_methods_package", group=registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw))
    assert main(["methods"]) == 0
    assert "no_such_methods_package\tplugin not loaded: ModuleNotFoundError: No module named " \
           "'no_such_methods_package'" in capsys.readouterr().out


def test_the_builtin_methods_failing_stays_loud(monkeypatch):
    """A broken built-in package is dstudio's own bug: discover() raises it, whatever the command."""
    monkeypatch.setattr(registry, "BUILTIN_METHODS", "dstudio.distill.no_such_methods")
    with pytest.raises(ModuleNotFoundError, match="dstudio.distill.no_such_methods"):
        registry.discover()


def test_the_core_imports_no_method():
    """The core (Trainer, registry, teacher, export) loads without importing any method module."""
    code = ("import sys, dstudio.distill.core.trainer, dstudio.distill.core.method, dstudio.distill.core.export; "
            "import dstudio.distill.core.teacher; print(sorted(m for m in sys.modules if '.methods' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_method_flags_come_from_config_metadata():
    from dstudio.app.parser import method_flags

    flags = method_flags(registry.discover())
    assert flags["--students"]["dest"] == "students" and flags["--students"]["methods"] == ["msd"]
    assert flags["--student-width"]["methods"] == ["msd", "slimflow"]
    assert set(flags["--init"]["methods"]) == {"consistency", "meanflow", "rectified_flow", "scm"}
    assert {"--target", "--pairs", "--prompts"} <= set(flags)


def test_each_phase_carries_its_loss_and_a_misspelt_phase_raises(tiny_teacher):
    """A phase names its own loss (no string dispatch); the forward the Trainer calls looks the phase up strictly,
    so a name no phase has trains no other loss."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.methods.sim import SIM, SIMConfig

    method = SIM(SIMConfig(), teacher=load_teacher(tiny_teacher))
    assert [(p.name, p.loss.__name__) for p in method.phases()] == [("fake", "fake_loss"), ("generator", "generator_loss")]
    assert method.phase("generator").loss == method.generator_loss
    with pytest.raises(ValueError, match=r"method 'sim' has no phase 'genrator' \(its phases: fake, generator\)"):
        method("genrator", Batch.data_free(2), 0)
