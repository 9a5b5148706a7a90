"""benchmarks/throughput.py on tiny settings: every pass of a step is recorded and timed alone, and the export's
pipeline is timed against its bare UNet (figures are the benchmark's business; here: they exist and add up)."""
import json

import pytest


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # conftest.py


@pytest.mark.parametrize("method,rank,passes", [("dmd2", 4, 11), ("rectified_flow", 0, 1)])
def test_throughput_smoke(benchmark_script, tiny_teacher, tmp_path, method, rank, passes):
    out = tmp_path / "t.json"
    result = benchmark_script("throughput").main(["--tiny", "--methods", method, "--teacher", str(tiny_teacher), "--data", "digits",
                            "--steps", "1", "--batch-size", "4", "--export-batch", "4", "--repeats", "1",
                            "--lora-rank", str(rank), "--set", "method.critic_ratio=1" if method == "dmd2" else
                            "trainer.seed=0", "--out", str(out)])
    (row,) = result["rows"]
    assert row["name"] == method and row["passes_per_step"] == [passes]
    assert row["step_seconds"] > 0 and row["passes_seconds"] > 0 and row["overhead"] > 0
    assert row["pipeline_images_per_s"] > 0 and 0 < row["efficiency"]
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_replay_backpropagates_into_the_parameters_trainable_when_the_pass_ran(benchmark_script):
    """A critic pass recorded in the critic phase is replayed after the Trainer has moved on to the generator
    phase (the critic frozen): the replay must still compute its parameter gradients, or the step's passes are
    under-counted (SIM's step read 1.3-1.4x its passes for that reason), and leave the flags as it found them."""
    import torch

    bench = benchmark_script("throughput")
    net = torch.nn.Linear(3, 3)
    passes = []
    with bench.recording([net], passes):
        net(torch.randn(2, 3))            # critic phase: trainable, input without gradient
    grads = []
    net.weight.register_hook(grads.append)
    net.requires_grad_(False)             # the phase changes before the replay
    (p,) = passes
    assert p.grad and p.trainable == frozenset(net.parameters())
    assert bench.time_pass(p, torch.autocast("cpu", enabled=False)) > 0
    assert len(grads) == 1 and not net.weight.requires_grad and net.weight.grad is None
