"""accelerate data parallelism: 2 CPU processes (gloo) reach the weights of 1 process with the same global batch,
and so does gradient accumulation; only the main process writes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

TOY = str(Path(__file__).with_name("ddp_toy.py"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=False)["modules"]["student"]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_port()), TOY, str(tmp_path / "two"), "4", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for args in (("one", "8", "1"), ("accum", "4", "2")):
        r = subprocess.run([sys.executable, TOY, str(tmp_path / args[0]), *args[1:]], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two_w, accum = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(tmp_path / "accum")
    from ddp_toy import Toy, ToyConfig

    start = Toy(ToyConfig()).student.state_dict()
    assert max((one[k] - start[k]).abs().max() for k in one) > 1e-2  # the weights did move
    for k in one:
        torch.testing.assert_close(two_w[k], one[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(accum[k], one[k], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "config.yaml", "log.jsonl"]
