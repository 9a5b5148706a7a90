"""Where the time goes: each method's training step against the network passes it makes, and the exported
one-step pipeline against its bare UNet forward.

    python benchmarks/throughput.py [--methods dmd2 sim ...] [--steps 5] [--batch-size 64] [--lora-rank 0]

Per method (the quick preset on the shipped teacher, or --teacher/--data): a few Trainer phase steps, each timed
whole; during each step every backbone call (the UNets, a LoRA base with the adapter that was on, the GAN head)
is recorded, then replayed alone with the same inputs and the same autocast: forward, plus backward of its output
when it ran with gradients. overhead = step time / sum of its passes' times (1.00: the loop adds nothing).
Then the exported pipeline at 1 NFE: images/s of the pipeline call against the bare UNet forward on the same
batch (efficiency = UNet time / pipeline time). Writes benchmarks/results/throughput.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

METHODS = ("dmd2", "sim", "msd", "consistency", "rectified_flow", "slimflow")
# what only shortens set-up (pair stores), or keeps the measured steps inside one phase (reflow)
SETUP = {"rectified_flow": ["method.num_pairs=256", "method.reflow_steps=100000", "method.perceptual=none"],
         "slimflow": ["method.num_pairs=256", "method.reflow_steps=100000", "method.perceptual=none"],
         "consistency": ["method.init=teacher"]}
TINY = {"dmd2": ["method.head_width=8"], "msd": ["method.students=2", "method.head_width=8"],
        "rectified_flow": ["method.num_pairs=8", "method.shard_size=8", "method.solver_steps=2"],
        "slimflow": ["method.num_pairs=8", "method.shard_size=8", "method.solver_steps=2"]}


@dataclass
class Pass:
    """One recorded backbone call: the module, its inputs, whether it ran with gradients, which of its parameters
    were trainable then (the phase's), the LoRA adapter on."""

    module: nn.Module
    args: tuple
    kwargs: dict
    grad: bool
    trainable: frozenset
    adapter: str | None = None
    seconds: float = field(default=0.0)


def backbones(method: nn.Module) -> list[nn.Module]:
    """The modules whose calls are network passes: diffusers models (outermost only) and GAN heads."""
    from diffusers import ModelMixin

    from dstudio.distill.methods.dmd2 import DiscriminatorHead

    out = []
    for m in method.modules():
        if isinstance(m, (ModelMixin, DiscriminatorHead)) and not any(m in set(o.modules()) for o in out):
            out.append(m)
    return out


@contextlib.contextmanager
def recording(modules: list[nn.Module], passes: list[Pass]):
    def hook(module, args, kwargs):
        trainable = frozenset(p for p in module.parameters() if p.requires_grad)
        passes.append(Pass(module, args, kwargs, torch.is_grad_enabled(), trainable,
                           getattr(module, "_dstudio_adapter", None)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad and value.is_floating_point())
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _output_tensor(out):
    out = out.sample if hasattr(out, "sample") else out
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def trainable_as_recorded(p: Pass):
    """The parameters that were trainable when the pass ran, and only those (the phase has changed since)."""
    params = list(p.module.parameters())
    before = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(q in p.trainable)
    try:
        yield
    finally:
        for q, flag in zip(params, before):
            q.requires_grad_(flag)
            q.grad = None


def time_pass(p: Pass, autocast) -> float:
    """The pass alone: forward (and backward of its output when it ran with gradients), synchronised."""
    from dstudio.distill.core.lora import adapter_active

    args, kwargs = _detached(p.args), _detached(p.kwargs)
    shared = hasattr(p.module, "_dstudio_lora_layers")
    lora = adapter_active(p.module, p.adapter) if shared else contextlib.nullcontext()
    with trainable_as_recorded(p):
        _sync()
        t0 = time.perf_counter()
        with lora, torch.set_grad_enabled(p.grad), autocast:
            out = _output_tensor(p.module(*args, **kwargs))
        if p.grad and out.requires_grad:
            out.float().sum().backward()
        _sync()
        return time.perf_counter() - t0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(name: str, args):
    """The run `dstudio distill NAME --preset P` assembles (prepare_run), in a temporary folder, ready to step."""
    from dstudio.distill.core.method import get_method
    from dstudio.distill.core.run import RunRequest, prepare_run

    sets = SETUP.get(name, []) + (TINY.get(name, []) if args.tiny else [])
    sets += [f"trainer.batch_size={args.batch_size}", f"trainer.mixed_precision='{args.mixed_precision}'",
             f"trainer.sample_every={10 ** 9}", f"trainer.checkpoint_every={10 ** 9}"]
    if args.lora_rank:
        sets.append(f"method.lora_rank={args.lora_rank}")
    sets += args.set or []
    data = args.data if get_method(name).needs_data else None  # data-free methods take no --data
    run = prepare_run(RunRequest(name, tempfile.mkdtemp(prefix=f"throughput-{name}-"), args.teacher, args.preset,
                                 data, sets, steps=args.steps + 1))
    run.trainer.begin()  # the method gets its run (pair stores are filled here), generators are seeded
    return run.method, run.trainer, run.out


def loop_overhead(method, trainer, steps: int) -> dict:
    modules = backbones(method)
    trainer.train_step()  # step 0, a warm-up (allocations, lazy initialisation)
    step_s, pass_s, counts = [], [], []
    for _ in range(steps):
        passes: list[Pass] = []
        with recording(modules, passes):
            _sync()
            t0 = time.perf_counter()
            trainer.train_step()  # step k, as the loop runs it (logging and checkpoints aside)
            _sync()
            step_s.append(time.perf_counter() - t0)
        pass_s.append(sum(time_pass(p, trainer.accelerator.autocast()) for p in passes))
        counts.append(len(passes))
    return {"step_seconds": round(sum(step_s) / steps, 4), "passes_seconds": round(sum(pass_s) / steps, 4),
            "passes_per_step": counts, "overhead": round(sum(step_s) / sum(pass_s), 3)}


def export_efficiency(method, trainer, run: Path, batch: int, repeats: int) -> dict | None:
    """Images/s of the exported pipeline at 1 NFE against its bare UNet forward on the same batch."""
    from dstudio.distill.core.teacher import load_pipeline

    if getattr(method, "kind", "class") != "class":
        return None
    with trainer.ema.applied(method.student_net()):
        method.export(run / "pipeline")
    pipe = load_pipeline(run / "pipeline", trainer.accelerator.device)
    labels = torch.arange(batch, device=trainer.accelerator.device) % max(method.num_classes, 1)
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[:1].expand(batch).to(trainer.accelerator.device)
    unet = pipe.unet
    x = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    device=trainer.accelerator.device)

    def timed(fn) -> float:
        fn()
        runs = []
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            _sync()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    pipe_s = timed(lambda: pipe(class_labels=labels.tolist(), num_inference_steps=1, output_type="pt",
                                generator=torch.Generator().manual_seed(0)))
    unet_s = timed(lambda: unet(x, t, class_labels=labels))
    return {"batch": batch, "pipeline_images_per_s": round(batch / pipe_s, 1),
            "unet_images_per_s": round(batch / unet_s, 1), "efficiency": round(unet_s / pipe_s, 3)}


def main(argv=None) -> dict:
    from dstudio.app.benchmark import write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    p.add_argument("--preset", default="quick")
    p.add_argument("--teacher", default=None, help="default: the shipped teacher")
    p.add_argument("--data", default="mnist")
    p.add_argument("--steps", type=int, default=5, help="measured steps per method (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--export-batch", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--set", action="append", help="a config override for every method, e.g. method.critic_ratio=1")
    p.add_argument("--tiny", action="store_true", help="smoke-test settings (tiny pair stores and heads)")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/throughput.json)")
    args = p.parse_args(argv)
    rows = []
    for name in args.methods:
        method, trainer, run = build(name, args)
        rows.append({"name": name, **loop_overhead(method, trainer, args.steps),
                     **(export_efficiency(method, trainer, run, args.export_batch, args.repeats) or {})})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    given = argv if argv is not None else sys.argv[1:]
    result = write_results("throughput", {
        "command": " ".join(["python", "benchmarks/throughput.py", *given]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "preset": args.preset, "batch_size": args.batch_size, "lora_rank": args.lora_rank, "rows": rows,
        "columns": [["name", "method"], ["step_seconds", "s/step"], ["passes_seconds", "its passes alone, s"],
                    ["overhead", "step / passes"], ["passes_per_step", "passes"],
                    ["pipeline_images_per_s", "1-NFE pipeline images/s"], ["unet_images_per_s", "UNet images/s"],
                    ["efficiency", "pipeline / UNet"]],
        "notes": ["overhead: the Trainer's step time over the sum of the network passes it made, each replayed alone "
                  "in the same run (forward and backward, as recorded); efficiency: the exported pipeline's images/s "
                  "at 1 NFE over its bare UNet forward's on the same batch"]}, path=args.out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
