"""Images of any family's pipeline for FID (the search's reference and `compare` on latent teachers): the conditions
of n images (prompts or class labels, cycled), the pipeline's own __call__ on seeded noise in batches, and the
teacher's own many-step images (its stock scheduler: DDIM trailing, or its FlowMatchEuler) as a reference set when
there is no data set to compare with.

Noise: batch b of a draw seeded `seed` comes from a generator seeded `seed + b's first index`, so two pipelines of
the same family (a teacher and its student) start from the same latents for the same `seed`.
"""
from __future__ import annotations

import torch

from dstudio.distill.evaluation.protocol import timed

REFERENCE_STEPS = 50  # the teacher's reference images: 50 steps of its stock scheduler
REFERENCE_SEED = 2000  # the reference set's noise, apart from the images it is compared with (0 / 1000 + seed)


def condition_ids(teacher, n: int, prompts: list[str] | None = None) -> torch.Tensor:
    """The rows of n images' conditions, cycled: prompt i mod their count for a text-to-image teacher (which needs
    them), class label i mod the classes for a class-conditional one, zeros for an unconditional one."""
    if teacher.takes_prompts and not prompts:
        raise ValueError(f"teacher '{teacher.source}' is text-to-image: give --prompts FILE (one prompt per line)")
    if prompts and not teacher.takes_prompts:
        takes = "class labels" if teacher.num_classes else "no condition"
        raise ValueError(f"--prompts is for text-to-image teachers; '{teacher.source}' takes {takes}")
    rows = len(prompts) if teacher.takes_prompts else teacher.num_classes
    return torch.arange(n) % rows if rows else torch.zeros(n, dtype=torch.long)


def condition_inputs(teacher, ids: torch.Tensor, prompts: list[str] | None = None) -> dict:
    """The conditions of images with these rows as a pipeline takes them (family.call_inputs' `prompts=` or
    `labels=`; none for an unconditional teacher)."""
    if teacher.takes_prompts:
        return {"prompts": [prompts[i] for i in ids.tolist()]}
    return {"labels": ids} if teacher.num_classes else {}


def _rows(condition: dict, i: int, j: int) -> dict:
    return {k: v[i:j] for k, v in condition.items()}


def draw(family, condition: dict, n: int, seed: int, steps: int | None = None, guidance: float = 1.0,
         batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """n images in [-1, 1] from the family's pipeline (with the scheduler it holds; `steps` None: the scheduler's own
    count) for `condition` (condition_inputs), and the seconds its calls took."""
    chunks, seconds = [], 0.0
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        gen = torch.Generator(family.device).manual_seed(seed + i)
        images, dt = timed(family.draw, j - i, steps, guidance, gen, **_rows(condition, i, j))
        chunks.append(images.float().cpu() * 2 - 1)
        seconds += dt
    return torch.cat(chunks), seconds


def stock_family(teacher):
    """The teacher's family around its own network with its stock scheduler (the reference images' sampler), at the
    teacher's sampled size."""
    from dstudio.distill.core.family import family_of, stock_scheduler

    pipe = teacher.family.with_network(teacher.network, stock_scheduler(teacher.scheduler))
    pipe.set_progress_bar_config(disable=True)
    return family_of(pipe, *teacher.family.size)


def teacher_reference(teacher, space, condition: dict, n: int, steps: int = REFERENCE_STEPS,
                      seed: int = REFERENCE_SEED, guidance: float = 1.0, batch_size: int = 64):
    """Statistics in `space` of the teacher's own `steps`-step images on `condition` (its stock scheduler, seeded
    noise): the reference of a teacher with no data set."""
    from dstudio.distill.evaluation.spaces import tensor_features
    from dstudio.distill.evaluation.stats import Stats

    family = stock_family(teacher)
    with torch.no_grad():
        images, _ = draw(family, condition, n, seed, steps, guidance, batch_size)
    cfg = f", guidance {guidance:g}" if guidance != 1 else ""
    source = (f"teacher '{teacher.source}' at {steps} steps of {type(family.pipeline.scheduler).__name__}{cfg}, "
              f"noise seed {seed}")
    return Stats.of(tensor_features(images, space), space.name, source)
