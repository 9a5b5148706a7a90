"""`dstudio plan TEACHER`: each method's memory on a teacher, full copies against LoRA, before anything is loaded
(dstudio.distill.core.plan does the accounting; this prints it)."""
from __future__ import annotations

import re

from dstudio.app.errors import UsageError

GB = 1024 ** 3
UNITS = {"": GB, "g": GB, "gb": GB, "gib": GB, "m": 2 ** 20, "mb": 2 ** 20, "mib": 2 ** 20, "t": 2 ** 40,
         "tb": 2 ** 40, "tib": 2 ** 40}
COLUMNS = ("trained", "frozen", "other", "grads", "AdamW", "EMA", "activations", "total", "bf16 base")


def memory_size(text: str) -> int:
    """'24GB', '24', '80 GiB', '512MB' -> bytes (GB = 2^30 bytes, as the table prints them)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--gpu-memory '{text}' must be a positive size such as 24GB, 80GiB or 512MB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def describe(teacher) -> list[str]:
    """The teacher as the plan sees it: family, network, state, grid and condition."""
    from dstudio.distill.core.plan import _numel

    f, d = teacher.family, teacher.denoiser
    grid = (f"flow matching, shift {d.shift:.3g}" if d.prediction_type == "flow"
            else f"{d.prediction_type} on alphas_cumprod")
    fields = {k: tuple(v.shape[1:]) for k, v in (teacher.null_cond.tensors() if teacher.null_cond else {}).items()}
    kind = ("prompts: " if teacher.takes_prompts else f"{teacher.num_classes} class labels: " if teacher.num_classes
            else "unconditional")
    condition = kind + ", ".join(f"{k} {v}" for k, v in fields.items())
    return [f"{type(f).__name__} family: {f.network_name} {type(f.network).__name__} "
            f"({_numel(f.network.parameters()) / 1e6:.1f}M parameters), state {tuple(teacher.sample_shape)} for "
            f"{f.size[0]}x{f.size[1]} images; {grid}; condition {condition}"]


def row_cells(row, memory: int | None, unit: int = GB) -> list[str]:
    """A row's cells in `unit`, and whether it fits `memory` (float32, or only with the frozen weights in bf16)."""
    from dstudio.distill.core.plan import BF16

    f = row.footprint
    values = [f.trained, f.frozen_params * 4, f.other, f.grads, f.adam, f.ema, f.activations, f.total(),
              f.total(BF16)]
    cells = [f"{v / unit:.2f}" for v in values]
    if memory:
        cells.append("yes" if f.total() <= memory else "bf16 base" if f.total(BF16) <= memory else "no")
    return cells


def unit_of(rows) -> tuple[int, str]:
    """GB, or MB when every total is under a GB."""
    small = all(r.footprint.total() < GB for r in rows if r.footprint)
    return (2 ** 20, "MB") if small else (GB, "GB")


def table(rows, memory: int | None) -> str:
    """The rows as aligned text: method, variant, the byte columns, and the fit (n/a rows say why)."""
    unit, name = unit_of(rows)
    head = ["method", "variant", *COLUMNS] + ([f"fits {memory / GB:.3g} GB"] if memory else [])
    body = [[r.method, r.variant, *row_cells(r, memory, unit)] for r in rows if r.footprint]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def fmt(line):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    lines = iter(body)
    return "\n".join([f"({name})", fmt(head)] + [fmt(next(lines)) if r.footprint else
                                                 f"{r.method.ljust(widths[0])}  {r.variant.ljust(widths[1])}  "
                                                 f"n/a: {r.reason}" for r in rows])


def cmd_plan(args) -> None:
    from dstudio.distill.core.method import discover, get_method
    from dstudio.distill.core.plan import plan, plan_teacher, process_baseline, quiet
    from dstudio.distill.core.teacher import DEFAULT_TEACHER

    memory = memory_size(args.gpu_memory) if args.gpu_memory is not None else None
    methods = [get_method(args.method).name] if args.method else sorted(
        n for n, c in discover().items() if c.is_distiller)
    source = str(args.teacher or DEFAULT_TEACHER)
    with quiet():
        teacher = plan_teacher(source, args.resolution)
        rows = plan(source, methods, args.lora_rank, args.batch_size, args.resolution)
    print(f"teacher '{source}'")
    print("\n".join(describe(teacher)))
    print(f"batch {args.batch_size}; trained weights, gradients, AdamW and EMA in float32; activations: saved for "
          f"backward at float32; frozen: the method's frozen networks; other: the pipeline's text encoders and VAE; "
          f"total: weights + AdamW + EMA + per phase the larger of activations and gradients; GB = 2^30 bytes")
    print(table(rows, memory))
    print(f"a CPU run adds this process's own memory, {process_baseline() / GB:.2f} GB here (Python, torch, "
          f"diffusers); a GPU run adds its CUDA context outside these figures")
