"""DMD2's memory on an SD1.5-shaped UNet: full trainable copies against LoRA adapters over the one frozen base.

    python benchmarks/memory.py [--steps 3] [--rank 64] [--cap-gb 22] [--variants full lora] [--tiny]
    python benchmarks/memory.py --strategy fsdp --processes 2 [--variants full] [--tiny]

Each variant runs in a fresh subprocess (its address space capped at --cap-gb with RLIMIT_AS on a CPU machine, so
a variant that does not fit fails inside its own process instead of taking the machine down): DMD2 on diffusers'
SD 1.5 UNet2DConditionModel config (random weights, 64x64 latents, batch 1, critic_ratio 1 so every step runs
both phases, the Trainer's own phase step), then its peak memory (process peak RSS; torch.cuda.max_memory_allocated
on a GPU), trainable and total parameters and seconds per step. Beside each run, and alone for an SDXL-shaped UNet
(built on the meta device, nothing allocated), the accounting: float32 bytes of the weights, gradients, AdamW
states and the student's EMA. Each row also has `dstudio plan`'s figure (dstudio.distill.core.plan: weights,
gradients, AdamW, EMA and traced activations, plus the child process's own memory measured before it built
anything, `baseline_rss_gb`) and its ratio to the measured peak; `--replan` recomputes those two columns of the
existing result file without running the variants again. `--tiny` runs a tiny UNet of the same kinds of blocks.
Writes benchmarks/results/memory.json (`--tiny`: memory-tiny.json).

`--strategy fsdp --processes N`: each variant at 1 process and sharded (trainer.strategy=fsdp) over N processes
launched by torchrun (gloo on CPUs), each capped at --cap-gb; the per-rank peaks, their maximum over the 1-process
peak, in memory-fsdp.json (memory-fsdp-tiny.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
GB = 1024 ** 3

# diffusers' Stable Diffusion 1.5 UNet (runwayml/stable-diffusion-v1-5, unet/config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5)
# diffusers' SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
# the smoke test's UNet: the same block kinds, tiny
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


def lora_parameter_count(unet, rank: int, targets) -> int:
    """Parameters of one peft LoRA adapter of rank r: r (in + out) per Linear, r (in k^2 + out) per Conv2d."""
    from torch import nn

    n = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            n += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return n


def accounting(unet_config: dict, rank: int) -> dict:
    """Float32 bytes DMD2 holds for its networks (no activations): weights, gradients, AdamW's two states, the EMA.

    Full copies: teacher + student + fake score (3P), gradients and AdamW of the two trained ones (2P + 4P), the
    student's EMA (P). LoRA: the one base (P) and two adapters of L each with gradients, AdamW and the EMA (9L)."""
    from diffusers import UNet2DConditionModel

    from dstudio.distill.core.lora import DEFAULT_TARGETS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    p = sum(t.numel() for t in unet.parameters())
    lo = lora_parameter_count(unet, rank, DEFAULT_TARGETS)
    full, lora = 10 * p, p + 9 * lo
    return {"unet_parameters": p, "lora_parameters": lo, "rank": rank,
            "full_gb": round(4 * full / GB, 2), "lora_gb": round(4 * lora / GB, 2),
            "lora_bf16_base_gb": round((2 * p + 4 * 9 * lo) / GB, 2), "lora_over_full": round(lora / full, 3)}


def build_teacher(unet_config: dict, device: str = "cpu"):
    """A StableDiffusionPipeline-shaped teacher around a random UNet (a tiny VAE and a one-layer text encoder of
    the UNet's cross-attention width; neither is used by a training step: conditions are encoded once); on the
    meta device (`dstudio plan`'s accounting), nothing is allocated."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT.parent / "tests"))
    from tiny_sd import write_tokenizer

    from dstudio.distill.core.teacher import teacher_from_pipeline

    import tempfile

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    width = unet_config["cross_attention_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=8 if width % 8 == 0 else 2, max_position_embeddings=8, projection_dim=16))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if device != "meta":
        return teacher_from_pipeline(pipe, "sd-shaped")
    from dstudio.distill.core.plan import meta_scalars

    for module in (vae, text_encoder):
        module.to("meta")
    with meta_scalars():
        return teacher_from_pipeline(pipe, "sd-shaped")


def run_variant(unet_config: dict, rank: int, steps: int, run_dir: Path, strategy: str = "ddp") -> dict:
    """DMD2 for `steps` Trainer steps at batch 1; peak memory, parameters and seconds per step."""
    from dstudio.distill.core.plan import process_baseline
    from dstudio.distill.core.run import RunRequest, prepare_run
    from dstudio.distill.data import LabelledImages

    import accelerate  # noqa: F401  (the libraries a run loads, before the baseline is read)
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from dstudio.distill.core.method import discover

    discover()
    baseline = process_baseline()  # the process with its libraries loaded, before any tensor of the run
    teacher = build_teacher(unet_config)
    size = unet_config["sample_size"]
    captions = ["a photo of a cat", "a red dog"]
    data = LabelledImages(images=torch.randn(2, 4, size, size), labels=torch.tensor([0, 1]), class_names=[],
                          name="random-latents", captions=captions)
    run = prepare_run(RunRequest("dmd2", run_dir, teacher, preset=None, data=data, steps=steps,
                                 overrides=["method.critic_ratio=1", f"method.lora_rank={rank}", "trainer.batch_size=1",
                                            f"trainer.strategy={strategy}"]))
    method, trainer = run.method, run.trainer
    trainer.begin()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    trained = {id(p) for ph in method.phases() for p in method.phase_parameters(ph)}
    out = {"rank": int(os.environ.get("RANK", "0")), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2),
           "baseline_rss_gb": round(baseline / GB, 3),
           "trainable_parameters": sum(p.numel() for p in method.parameters() if id(p) in trained),
           "total_parameters": sum(p.numel() for p in {id(p): p for m in (method, teacher.unet)
                                                       for p in m.parameters()}.values()),
           "step_seconds": [round(t, 2) for t in times],
           "step_seconds_after_first": round(sum(times[1:]) / max(1, len(times) - 1), 2)}
    if torch.cuda.is_available():
        out["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
    return out


def child(args) -> None:
    import tempfile

    config = TINY_UNET if args.tiny else SD15_UNET
    result = run_variant(config, args.rank if args.variant == "lora" else 0, args.steps, Path(tempfile.mkdtemp()),
                         args.strategy)
    print("RESULT " + json.dumps(result), flush=True)
    from dstudio.distill.core.sharding import exit_distributed

    exit_distributed(0)


def run_capped(args, variant: str, processes: int = 1) -> dict:
    """One variant in a fresh subprocess (torchrun's N processes under FSDP), each process's address space capped on
    CPU machines; a failure is recorded. Several processes: the peak is the largest rank's, each rank's beside it."""
    launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                      str(processes), "--master_port", str(free_port())]
    cmd = [*launch, __file__, "--child", variant, "--steps", str(args.steps), "--rank", str(args.rank),
           "--strategy", args.strategy if processes > 1 else "ddp"]
    cmd += ["--tiny"] if args.tiny else []
    cap = int(args.cap_gb * GB)
    env = dict(os.environ)
    if args.malloc_mmap_threshold:  # glibc: blocks this large are mmapped and go back to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)

    def limit():
        if not torch.cuda.is_available():  # CUDA reserves more virtual memory than any cap would allow
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, env=env)
    ranks = sorted((json.loads(ln[7:]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")),
                   key=lambda row: row["rank"])
    if r.returncode == 0 and len(ranks) == processes:
        row = {"status": "ok", "wall_seconds": round(time.time() - t0, 1), "processes": processes, **ranks[0]}
        row["peak_rss_gb"] = max(x["peak_rss_gb"] for x in ranks)
        row["rank_peak_rss_gb"] = [x["peak_rss_gb"] for x in ranks]
        return row
    tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {r.returncode}"]
    return {"status": "failed", "reason": tail[0][-300:], "cap_gb": args.cap_gb,
            "wall_seconds": round(time.time() - t0, 1)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_plan(rows: list[dict], shape: dict, rank: int) -> list[dict]:
    """Each row with `dstudio plan`'s figure for its variant: its tensors, plus the row's measured process baseline
    on a CPU, and its ratio to the measured peak (RSS; the CUDA allocator's peak on a GPU)."""
    from dstudio.distill.core.plan import plan

    planned = {r.variant.split()[0].lower(): r.footprint
               for r in plan(None, ["dmd2"], rank, 1, teacher_factory=lambda: build_teacher(shape, "meta"))}
    for row in rows:
        if row.get("processes", 1) > 1:  # the plan is one process's
            continue
        tensors = planned[row["name"]].total() / GB
        row["plan_tensors_gb"] = round(tensors, 2)
        if row.get("cuda_max_allocated_gb"):
            row["plan_over_peak"] = round(tensors / row["cuda_max_allocated_gb"], 3)
        elif row.get("baseline_rss_gb") is not None:
            row["plan_gb"] = round(tensors + row["baseline_rss_gb"], 2)
            row["plan_over_peak"] = round(row["plan_gb"] / row["peak_rss_gb"], 3)
    return rows


def replan(args) -> dict:
    """The plan columns of an existing result file, recomputed (the variants are not run again)."""
    from dstudio.app.benchmark import write_results

    path = Path(args.out) if args.out else ROOT / "results" / f"{'memory-tiny' if args.tiny else 'memory'}.json"
    result = json.loads(path.read_text())
    result["rows"] = with_plan(result["rows"], TINY_UNET if args.tiny else SD15_UNET, args.rank)
    payload = {k: v for k, v in result.items() if k not in ("benchmark", "date", "machine", "versions")}
    return write_results(result["benchmark"], {**payload, "columns": COLUMNS}, path=path)


COLUMNS = [["name", "variant"], ["status", "status"], ["peak_rss_gb", "peak RSS GB"],
           ["cuda_max_allocated_gb", "CUDA peak GB"], ["accounting_gb", "weights+grads+Adam+EMA GB"],
           ["plan_gb", "dstudio plan GB"], ["plan_over_peak", "plan / peak"],
           ["trainable_parameters", "trainable"], ["total_parameters", "total parameters"],
           ["step_seconds_after_first", "s/step"]]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--cap-gb", type=float, default=22.0, help="address-space cap per variant (CPU machines)")
    p.add_argument("--variants", nargs="*", choices=("full", "lora"), default=["full", "lora"])
    p.add_argument("--tiny", action="store_true", help="a tiny UNet of the same block kinds (smoke test)")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/memory[-tiny].json)")
    p.add_argument("--replan", action="store_true", help="recompute the plan columns of the existing result file")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc's MALLOC_MMAP_THRESHOLD_ in the variants' processes (e.g. 65536: freed activations go "
                        "back to the OS, so the peak RSS reads what the run holds, not what the C heap kept)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="fsdp: also run each variant sharded")
    p.add_argument("--processes", type=int, default=1, help="the sharded runs' processes (torchrun)")
    p.add_argument("--child", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.variant = args.child
        return child(args)
    if args.replan:
        return replan(args)
    if args.strategy == "fsdp":
        if args.processes < 2:
            p.error("--strategy fsdp needs --processes 2 or more")
        return main_sharded(args, argv if argv is not None else sys.argv[1:])
    from dstudio.app.benchmark import write_results

    shape = TINY_UNET if args.tiny else SD15_UNET
    rows = [{"name": v, **run_capped(args, v), "accounting_gb": accounting(shape, args.rank)["full_gb" if v == "full"
                                                                                            else "lora_gb"]}
            for v in args.variants]
    rows = with_plan(rows, shape, args.rank)
    by_name = {r["name"]: r for r in rows}
    ratio = None
    if {"full", "lora"} <= by_name.keys() and by_name["full"]["status"] == by_name["lora"]["status"] == "ok":
        ratio = round(by_name["lora"]["peak_rss_gb"] / by_name["full"]["peak_rss_gb"], 3)
    books = {"sd15": accounting(SD15_UNET, args.rank), "sdxl": accounting(SDXL_UNET, args.rank)}
    notes = [f"{k}: {a['unet_parameters'] / 1e6:.1f}M UNet parameters, {a['lora_parameters'] / 1e6:.1f}M per rank-"
             f"{a['rank']} adapter; float32 weights + gradients + AdamW + EMA: {a['full_gb']} GB with full copies, "
             f"{a['lora_gb']} GB with adapters ({a['lora_over_full']}x; {a['lora_bf16_base_gb']} GB with the base in "
             f"bf16)" for k, a in books.items()]
    notes += [f"{r['name']}: failed under its {r['cap_gb']} GB address-space cap: {r['reason']}"
              for r in rows if r["status"] != "ok"]
    name = "memory-tiny" if args.tiny else "memory"
    given = argv if argv is not None else sys.argv[1:]
    result = write_results(name, {
        "command": " ".join(["python", "benchmarks/memory.py", *given]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "unet": "tiny" if args.tiny else "sd15", "steps": args.steps, "batch_size": 1, "rows": rows,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "lora_over_full_peak": ratio, "accounting": books, "notes": notes, "columns": COLUMNS}, path=args.out)
    print(json.dumps(result, indent=1))
    return result



def main_sharded(args, given: list[str]) -> dict:
    """Each variant at 1 process, then sharded over --processes: per-rank peaks and the largest over the 1-process."""
    from dstudio.app.benchmark import write_results

    rows, ratios = [], {}
    for v in args.variants:
        one, sharded = run_capped(args, v), run_capped(args, v, args.processes)
        rows += [{"name": v, "strategy": "one process", **one},
                 {"name": v, "strategy": f"fsdp x{args.processes}", **sharded}]
        if one["status"] == sharded["status"] == "ok":
            ratios[v] = round(sharded["peak_rss_gb"] / one["peak_rss_gb"], 3)
    notes = [f"{v}: largest per-rank peak under FSDP over {args.processes} processes / 1-process peak = {r}"
             for v, r in ratios.items()]
    notes += [f"{r['name']} ({r['strategy']}): failed under its {r['cap_gb']} GB address-space cap: {r['reason']}"
              for r in rows if r["status"] != "ok"]
    columns = [["name", "variant"], ["strategy", "strategy"], ["status", "status"], ["peak_rss_gb", "peak RSS GB"],
               ["rank_peak_rss_gb", "per-rank peak GB"], ["step_seconds_after_first", "s/step"]]
    result = write_results("memory-fsdp-tiny" if args.tiny else "memory-fsdp", {
        "command": " ".join(["python", "benchmarks/memory.py", *given]), "unet": "tiny" if args.tiny else "sd15",
        "steps": args.steps, "batch_size": 1, "processes": args.processes, "rows": rows,
        "sharded_over_one_process_peak": ratios, "notes": notes, "columns": columns}, path=args.out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()