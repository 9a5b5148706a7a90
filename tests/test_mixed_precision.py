"""Mixed precision through accelerate: every trainer runs its phases under bf16 autocast (on the CPU here; the same
code path as GPUs) with finite losses, and exports float32 weights that sample finite images."""
import json

import pytest
import torch

from dstudio.app.cli import main

from dstudio.distill.core.method import discover

FLOW_FAST = ["--set", "method.num_pairs=8", "--set", "method.shard_size=8", "--set", "method.solver_steps=2",
             "--set", "method.reflow_steps=1", "--set", "method.perceptual=none"]
FAST = {  # options that keep a method's two steps small; a method not named here runs on its quick preset
    "dmd2": ["--set", "method.head_width=8", "--set", "method.critic_ratio=1"],
    "msd": ["--students", "2", "--set", "method.head_width=8", "--set", "method.critic_ratio=1"],
    "rectified_flow": FLOW_FAST,
    "slimflow": FLOW_FAST,
}
DISTILLERS = sorted(n for n, c in discover().items() if c.is_distiller)


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # conftest.py


@pytest.mark.parametrize("method", DISTILLERS)
def test_bf16_autocast(method, tiny_teacher, tmp_path):
    from dstudio.distill.core.method import get_method
    from dstudio.distill.core.teacher import load_pipeline

    run = tmp_path / "run"
    data = ["--data", "digits"] if get_method(method).needs_data else []
    args = ["distill", method, "--teacher", str(tiny_teacher), *data, "--steps", "2", "--out", str(run),
            "--eval-per-class", "0", "--set", "trainer.mixed_precision=bf16", "--set", "trainer.batch_size=4",
            "--set", "trainer.sample_every=100", *FAST.get(method, [])]
    assert main(args) == 0
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [v for row in logs for k, v in row.items() if "/" in k]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    pipe = load_pipeline(run / "pipeline")
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    images = pipe(class_labels=[0, 1], output_type="np").images
    assert images.shape[0] == 2 and torch.isfinite(torch.from_numpy(images)).all()


def test_a_phase_batch_source_leaves_no_autocast_cast_to_its_loss(tmp_path):
    """A phase's batch source opens in its own autocast region: weights it casts while other values are swapped in
    (the 2-RF's EMA weights for its pairs) are not reused by the loss, which sees the live weights. (Opened inside the
    loss's region, autocast's cache handed the first distillation step the EMA weights' bf16 casts.)"""
    from dataclasses import dataclass

    from torch import nn

    from dstudio.distill.core.method import Batch, Method, Phase
    from dstudio.distill.core.trainer import Trainer, TrainerConfig

    class Source:
        def next(self, size, device):
            return Batch.data_free(size)

    @dataclass
    class ToyConfig:
        lr: float = 0.1

    class Toy(Method):
        name, Config, needs_teacher, needs_data = "toy-source", ToyConfig, False, False

        def __init__(self):
            super().__init__(ToyConfig())
            self.student = nn.Linear(4, 4)

        def phases(self):
            return [Phase("fit", ("student",), loss=self.fit_loss, lr=0.1, batches=self.open_source)]

        def open_source(self):
            with torch.no_grad():  # a forward with other weights in place, then the live ones back (EMA.applied)
                live = self.student.weight.detach().clone()
                self.student.weight.zero_()
                self.student(torch.ones(1, 4))
                self.student.weight.copy_(live)
            return Source()

        def fit_loss(self, batch, step):
            self.seen = self.student(torch.ones(1, 4)).float()
            return self.seen.sum(), {}

        def sample(self, labels, generator):
            return torch.zeros(len(labels), 1, 2, 2)

        def export(self, path):
            pass

    m = Toy()
    trainer = Trainer(m, TrainerConfig(steps=1, batch_size=2, mixed_precision="bf16"), tmp_path)
    trainer.begin()
    with torch.no_grad(), trainer.accelerator.autocast():
        want = m.student(torch.ones(1, 4)).float()
    trainer.train_step()
    torch.testing.assert_close(m.seen.detach(), want)
