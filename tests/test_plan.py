"""`dstudio plan` (#31, item 5): its parameter accounting is exact against the methods a run builds, its traced
activations (on the meta device) match the tensors the real phases save for backward on the CPU, and a step's
measured peak (torch's CPU allocations, by the profiler) is its plan's within 15%, on tiny family pipelines whose
activations are the networks' (the SD1.5-shaped rows are benchmarks/memory.py's)."""
import pytest
import torch

from dstudio.distill.core.plan import SavedBytes, _unpack, plan

BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks, one intra-op thread


def built(folder, captioned_dir, rank: int, tmp_path):
    """DMD2 as `dstudio distill` builds it on the real teacher (its Trainer begun), batch BATCH."""
    from dstudio.distill.core.run import RunRequest, prepare_run

    run = prepare_run(RunRequest("dmd2", tmp_path / f"run{rank}", str(folder), preset=None, data=str(captioned_dir),
                                 steps=3, overrides=[f"trainer.batch_size={BATCH}", "method.critic_ratio=1",
                                                     f"method.lora_rank={rank}", "method.head_width=8"]))
    run.trainer.begin()
    return run


def footprint(folder, rank: int):
    rows = plan(str(folder), ["dmd2"], rank or 4, BATCH, options={"head_width": 8})
    return rows[1 if rank else 0].footprint


@pytest.mark.parametrize("family,rank", [("sd15", 0), ("flux-dev", 4)])
def test_plan_matches_what_the_run_holds(tiny_family, captioned_dir, family, rank, tmp_path):
    from torch.profiler import ProfilerActivity, profile

    f, run = footprint(tiny_family(family), rank), built(tiny_family(family), captioned_dir, rank, tmp_path)
    m = run.method
    phases = {ph.name: {id(p): p for p in m.phase_parameters(ph)} for ph in m.phases()}
    trained = {k: p for ps in phases.values() for k, p in ps.items()}
    assert f.trained == 4 * sum(p.numel() for p in trained.values())
    assert f.adam == 8 * sum(p.numel() for ps in phases.values() for p in ps.values())
    assert f.ema == 4 * sum(p.numel() for p in m.student_net().parameters() if id(p) in trained)
    assert f.frozen_params == sum(p.numel() for p in m.parameters() if id(p) not in trained)
    for ph in m.phases():  # the saved-for-backward bytes of each real phase, as the plan traced them
        m.train_only(ph)
        counter = SavedBytes(list(m.parameters()) + list(run.teacher.network.parameters()))
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack):
            ph.loss(run.trainer.stream.next("cpu"), 1)
        assert f.phases[ph.name][0] == pytest.approx(counter.peak, rel=0.1), ph.name
    run.trainer.train_step()  # the optimisers' states exist from here on
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run.trainer.train_step()
    now = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    assert f.backward_peak() == pytest.approx(peak, rel=0.15)


def test_plan_command(tiny_family, capsys):
    from dstudio.app.cli import main

    assert main(["plan", str(tiny_family("pixart_sigma")), "--lora-rank", "4", "--gpu-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "PixArt family: transformer PixArtTransformer2DModel" in out and "fits 1 GB" in out
    for method in ("dmd2", "rectified_flow", "sim", "consistency"):
        assert any(line.startswith(method) and line.rstrip().endswith("yes") for line in out.splitlines()), method
    assert "n/a: msd needs a class-conditional teacher" in out
    assert main(["plan", str(tiny_family("dit")), "--method", "msd", "--gpu-memory", "1MB"]) == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("msd")] == ["no", "no"]
