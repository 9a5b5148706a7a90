"""trainer.strategy=fsdp on 2 CPU processes (gloo): FSDP2 reaches the weights of 1 process with the same global batch
(a toy MLP in float32, and a student copy of a real UNet and of a DiT teacher next to the frozen teacher, in float64),
each rank holds about half of the parameter and optimiser bytes, a kill and --resume under FSDP continues to the same
weights, the sharded checkpoint resumes on 1 process, the export loads in plain diffusers, and activation
checkpointing, a bf16 frozen teacher and LoRA students run sharded."""
import json
import shutil

import pytest
import torch
from launch import TOY, max_diff, state, toy, torchrun, weights
from safetensors.torch import load_file

STEPS = 10
BYTES = ("params", "optimizer", "ema")


def report(prefix, ranks: int) -> list[dict]:
    return [json.loads(open(f"{prefix}.rank{r}.json").read()) for r in range(ranks)]


@pytest.mark.parametrize("case", ["toy", "unet", "dit"])
def test_two_fsdp_processes_equal_one_process_and_each_holds_half(case, tmp_path, tiny_teacher, tiny_family):
    """10 AdamW steps. The real backbones run in float64: in float32 the gradients of the biases before a GroupNorm
    are float noise, which Adam's normalisation turns into steps of size lr (2-process DDP differs from 1 process
    by 7.6e-4 there, as FSDP does)."""
    args = {"toy": [], "unet": ["--method", "regress", "--teacher", str(tiny_teacher), "--dtype", "float64"],
            "dit": ["--method", "regress", "--teacher", str(tiny_family("dit")), "--dtype", "float64"]}[case]
    common = [*args, "--steps", str(STEPS), "--checkpoint-every", str(STEPS)]
    toy(tmp_path / "two", "4", "1", "--strategy", "fsdp", "--report", str(tmp_path / "two"), *common, processes=2)
    toy(tmp_path / "one", "8", "1", "--report", str(tmp_path / "one"), *common)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max_diff(one, two) <= 1e-5
    if case == "toy":  # with 2 micro-batches per step, reduce-scattered once, at the last; and resuming 1 process's
        toy(tmp_path / "accum", "2", "2", "--strategy", "fsdp", *common, processes=2)  # checkpoint.pt sharded
        toy(tmp_path / "half", "8", "1", "--steps", str(STEPS // 2))
        toy(tmp_path / "half", "4", "1", "--strategy", "fsdp", "--resume", *common, processes=2)
        for run in ("accum", "half"):
            assert max_diff(one, weights(tmp_path / run)) <= 1e-5, run
        assert not (tmp_path / "half" / "checkpoint.pt").exists()  # the sharded checkpoint replaced it
    assert (tmp_path / "two" / "checkpoint" / "rank-00001-of-00002.safetensors").is_file()
    whole, shards = report(tmp_path / "one", 1)[0], report(tmp_path / "two", 2)
    for key in BYTES:
        assert sum(s[key] for s in shards) == whole[key]
        assert all(0.4 * whole[key] <= s[key] <= 0.6 * whole[key] for s in shards), (key, whole, shards)


@pytest.fixture(scope="module")
def dmd2_run(tmp_path_factory, tiny_teacher):
    """4 DMD2 steps on 2 processes under FSDP on the tiny UNet teacher, exported."""
    run = tmp_path_factory.mktemp("fsdp-dmd2") / "run"
    toy(run, "4", "1", "--method", "dmd2", "--teacher", str(tiny_teacher), "--strategy", "fsdp", "--steps", "4",
        "--checkpoint-every", "4", "--export", processes=2)
    return run


def dmd2(run, teacher, *args, processes=2):
    return toy(run, "4", "1", "--method", "dmd2", "--teacher", str(teacher), "--steps", "4", "--checkpoint-every",
               "4", *args, processes=processes)


def assert_same_state(a, b, atol=1e-6):
    for name in a["modules"]:
        assert max_diff(a["modules"][name], b["modules"][name]) <= atol, name
    assert max(float((x - y).abs().max()) for x, y in zip(a["ema"], b["ema"])) <= atol
    assert a["step"] == b["step"] and a["stream"] == b["stream"]


def test_a_signal_to_one_fsdp_rank_stops_both_and_resume_continues_to_the_same_weights(dmd2_run, tiny_teacher,
                                                                                        tmp_path):
    """SIGTERM reaches rank 1 during step 1: both ranks stop after it with a whole sharded checkpoint; --resume on 2
    processes ends where the uninterrupted run ended (each rank's RNG state is in its shard)."""
    run = tmp_path / "run"
    r = torchrun(TOY, str(run), "4", "1", "1", "--method", "dmd2", "--teacher", str(tiny_teacher), "--strategy",
                 "fsdp", "--steps", "4", "--checkpoint-every", "4")
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: stopped at step 2; rerun with --resume" in r.stderr, r.stderr[-3000:]
    assert state(run)["step"] == 2 and not list(run.glob(".checkpoint.*"))
    dmd2(run, tiny_teacher, "--strategy", "fsdp", "--resume", "--export")
    assert_same_state(state(run), state(dmd2_run))


def test_the_sharded_checkpoint_resumes_on_one_process_and_the_export_loads_in_plain_diffusers(dmd2_run, tiny_teacher,
                                                                                              tmp_path):
    """The 2-process checkpoint, gathered, resumes on 1 process (no steps left: it exports): the same student as the
    FSDP export, which plain diffusers loads and samples."""
    from test_exports import plain_diffusers

    run = tmp_path / "one"
    shutil.copytree(dmd2_run, run, ignore=shutil.ignore_patterns("pipeline", "samples"))
    dmd2(run, tiny_teacher, "--resume", "--export", processes=1)
    a, b = (load_file(r / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors") for r in (dmd2_run, run))
    assert max_diff(a, b) == 0
    out = plain_diffusers(tmp_path, dmd2_run / "pipeline", (0, {"class_labels": [1, 2], "num_inference_steps": 1}))
    assert torch.isfinite(out["images"][0]).all() and out["images"][0].shape[0] == 2


def test_activation_checkpointing_under_fsdp_changes_nothing(dmd2_run, tiny_teacher, tmp_path):
    dmd2(tmp_path / "ac", tiny_teacher, "--strategy", "fsdp", "--gradient-checkpointing")
    assert_same_state(state(tmp_path / "ac"), state(dmd2_run))


def test_a_bf16_frozen_teacher_trains_sharded(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    dmd2(run, tiny_teacher, "--strategy", "fsdp", "--mixed-precision", "bf16", "--frozen-dtype", "bf16",
         "--report", str(tmp_path / "bytes"))
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert logs and all(torch.isfinite(torch.tensor(v)) for line in logs for k, v in line.items() if "/" in k)
    ranks = report(tmp_path / "bytes", 2)
    assert all(0.4 <= r["params"] / sum(x["params"] for x in ranks) <= 0.6 for r in ranks)


def test_lora_students_shard_the_base_and_export_as_on_one_process(tiny_teacher, tmp_path):
    """LoRA (rank 2): the adapters train inside the sharded base; the fused export and the adapter file equal those of
    the same checkpoint gathered and exported by 1 process."""
    two, one = tmp_path / "two", tmp_path / "one"
    dmd2(two, tiny_teacher, "--strategy", "fsdp", "--lora-rank", "2", "--export")
    shutil.copytree(two, one, ignore=shutil.ignore_patterns("pipeline", "samples"))
    dmd2(one, tiny_teacher, "--lora-rank", "2", "--resume", "--export", processes=1)
    for part in ("unet/diffusion_pytorch_model.safetensors", "lora/pytorch_lora_weights.safetensors"):
        assert max_diff(load_file(two / "pipeline" / part), load_file(one / "pipeline" / part)) == 0, part


def test_bad_strategies_are_one_line_errors_and_one_process_runs_as_is(tmp_path):
    from dstudio.distill.core.config import ConfigError
    from dstudio.distill.core.trainer import TrainerConfig

    with pytest.raises(ConfigError, match=r"trainer.strategy='zero' is not one of ddp, fsdp"):
        TrainerConfig(strategy="zero").validate()
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp takes trainer.mixed_precision=no or bf16"):
        TrainerConfig(strategy="fsdp", mixed_precision="fp16").validate()
    toy(tmp_path / "one", "8", "1", "--strategy", "fsdp")  # no launch: one ordinary process, checkpoint.pt
    assert (tmp_path / "one" / "checkpoint.pt").is_file() and not (tmp_path / "one" / "checkpoint").exists()
