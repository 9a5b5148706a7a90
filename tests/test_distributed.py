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
    return torch.load(run / "checkpoint.pt", weights_only=True)["modules"]["student"]


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


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 alone during step 2: the flag is all-reduced, so both ranks finish step 2, the main
    process checkpoints it, and both stop there (without the all-reduce rank 0 would wait for rank 1 forever)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_port()), TOY, str(tmp_path / "two"), "4", "1", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "rank 0: stopped at step 2; rerun with --resume" in run.stderr, run.stderr[-3000:]
    assert "rank 1: stopped at step 2; rerun with --resume" in run.stderr, run.stderr[-3000:]
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_search_splits_its_samples_across_two_processes(tiny_teacher, tmp_path):
    """`dstudio search` under a 2-process launch: each process samples half of every candidate, the features are
    gathered, and the search (fitness of every candidate, best schedule) equals the single-process one."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["search", "--teacher", str(tiny_teacher), "--nfe", "3", "--num-samples", "40", "--population", "4",
            "--generations", "2", "--top-k", "2"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_port()), "-m", "dstudio.app.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("best 3-NFE schedule") == 1  # only the main process reports
    one = subprocess.run([sys.executable, "-m", "dstudio.app.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("one", "two"))
    assert [h["candidate"] for h in a["history"]] == [h["candidate"] for h in b["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert abs(x["fitness"] - y["fitness"]) <= 1e-6 * max(1.0, abs(x["fitness"]))
    assert a["best"] == b["best"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
