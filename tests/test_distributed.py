"""accelerate data parallelism: 2 CPU processes (gloo) reach the weights of 1 process with the same global batch,
and so does gradient accumulation; only the main process writes; every rank of a distributed run (DDP or FSDP) exits
with 0, run after run."""
import pytest
import torch
from launch import TOY, max_diff, python, state, toy, torchrun, weights


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    toy(tmp_path / "two", "4", "1", processes=2)
    toy(tmp_path / "one", "8", "1")
    toy(tmp_path / "accum", "4", "2")
    one, two_w, accum = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tmp_path / "accum")
    from ddp_toy import Toy, ToyConfig

    start = Toy(ToyConfig()).student.state_dict()
    assert max_diff(one, start) > 1e-2  # the weights did move
    for k in one:
        torch.testing.assert_close(two_w[k], one[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(accum[k], one[k], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "config.yaml", "log.jsonl"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_exits_cleanly_run_after_run(strategy, tmp_path):
    """5 two-process runs in a row (2 steps, 2 micro-batches: FSDP's unsynchronised accumulation too) each exit with 0
    on every rank. Before sharding.exit_distributed about one run in 15 had a rank abort after finishing ("terminate
    called without an active exception", -6): a gloo worker thread, which torch keeps alive after
    destroy_process_group, released a work item holding a Python tensor during interpreter shutdown."""
    for i in range(5):
        r = toy(tmp_path / str(i), "2", "2", "--strategy", strategy, "--steps", "2", "--checkpoint-every", "2",
                processes=2)
        assert "terminate called" not in r.stderr
    assert state(tmp_path / "4")["step"] == 2
    assert (tmp_path / "4" / ("checkpoint" if strategy == "fsdp" else "checkpoint.pt")).exists()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 alone during step 2: the flag is all-reduced, so both ranks finish step 2, the main
    process checkpoints it, and both stop there (without the all-reduce rank 0 would wait for rank 1 forever)."""
    run = torchrun(TOY, str(tmp_path / "two"), "4", "1", "1")
    assert run.returncode != 0
    assert "rank 0: stopped at step 2; rerun with --resume" in run.stderr, run.stderr[-3000:]
    assert "rank 1: stopped at step 2; rerun with --resume" in run.stderr, run.stderr[-3000:]
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_search_splits_its_samples_across_two_processes(tiny_teacher, tmp_path):
    """`dstudio search` under a 2-process launch: each process samples half of every candidate, the features are
    gathered, and the search (fitness of every candidate, best schedule) equals the single-process one."""
    import json

    args = ["search", "--teacher", str(tiny_teacher), "--nfe", "3", "--num-samples", "40", "--population", "4",
            "--generations", "2", "--top-k", "2"]
    two = torchrun("-m", "dstudio.app.cli", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("best 3-NFE schedule") == 1  # only the main process reports
    one = python("-m", "dstudio.app.cli", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("one", "two"))
    assert [h["candidate"] for h in a["history"]] == [h["candidate"] for h in b["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert abs(x["fitness"] - y["fitness"]) <= 1e-6 * max(1.0, abs(x["fitness"]))
    assert a["best"] == b["best"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
