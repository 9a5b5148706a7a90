"""Teacher vs student for a latent family's teacher (SD, SDXL, SD3, FLUX, PixArt, DiT; `RUN/eval.json`), where the
embedded MNIST protocol does not apply.

Both pipelines draw through their own __call__ (the family's call inputs) on the same conditions (prompts cycled, or
class labels 0, 1, ... cycled) and the same seeded noise (evaluation.draw). The teacher samples at `teacher_steps`
steps of its stock scheduler (DDIM trailing, or its Euler) with the classifier-free guidance `guidance` the student
was distilled at (a run's `method.guidance`), the student with none (w = 1: the guidance is in its weights).
Reference: an image folder or .npz when given (a run's captioned or class folder), else the teacher's own
`teacher_steps`-step images on the same conditions from other noise (draw.REFERENCE_SEED); then the teacher's row is
its sampling floor at this image count (two independent draws of one model), and the student's ratio to it reads as
"how far above the teacher's own floor". FID in the `pixels` space (offline, any size; grayscale, at most 32x32).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dstudio.distill.evaluation.compare import Reference, score, vs_teacher
from dstudio.distill.evaluation.draw import REFERENCE_SEED, condition_ids, condition_inputs, draw, stock_family, \
    teacher_reference

NOISE_SEED = 0  # both rows' noise: batch b from seed NOISE_SEED + its first index
FAMILY_SPACES = ("pixels",)


def family_reference(teacher, space, condition: dict, n: int, ref: str | Path | None, steps: int,
                     guidance: float = 1.0):
    """A row's reference statistics: `ref` (an image folder or .npz) when given, else the teacher's own images."""
    from dstudio.distill.evaluation.stats import reference_stats

    if ref is not None:
        return reference_stats(str(ref), space, teacher.pixel_shape[-1])
    return teacher_reference(teacher, space, condition, n, steps, REFERENCE_SEED, guidance)


def data_reference(data: str | None) -> str | None:
    """A run's --data as an FID reference: an image folder FID can read (one size), else None (the teacher's own)."""
    from dstudio.distill.evaluation.spaces import FIDError, scan_folder

    if not data or not Path(data).is_dir():
        return None
    try:
        scan_folder(data)
    except FIDError:
        return None
    return data


def student_family(teacher, student_dir):
    """The exported student as its family's pipeline, on the teacher's device and dtype, at the teacher's size."""
    from dstudio.distill.core.family import family_of
    from dstudio.distill.core.teacher import load_pipeline

    weights = next(teacher.network.parameters())
    pipe = load_pipeline(student_dir, device=weights.device, dtype=weights.dtype)
    return family_of(pipe, *teacher.family.size)


def description(teacher, n: int, ref: str | Path | None, steps: int, guidance: float) -> dict:
    """What eval.json's figures were measured on (the protocol's fields of a latent teacher's comparison)."""
    conditions = ("prompts cycled in their order" if teacher.takes_prompts else
                  f"class labels 0..{teacher.num_classes - 1} cycled" if teacher.num_classes else "none")
    reference = (str(ref) if ref is not None else
                 f"the teacher's own {steps}-step images on the same conditions, noise seed {REFERENCE_SEED}: the "
                 f"teacher row is then its sampling floor at {n} images (two independent draws of one model)")
    return {"images": n, "conditions": conditions, "guidance": {"teacher": guidance, "student": 1.0},
            "noise_seed": NOISE_SEED,
            "noise": f"batch b from seed {NOISE_SEED} + its first index, the same for teacher and student",
            "teacher": f"{steps} steps of its stock scheduler", "reference": reference}


def compare_family(teacher, student_dir, n: int, prompts: list[str] | None = None, teacher_steps: int = 50,
                   ref: str | Path | None = None, spaces: tuple[str, ...] = FAMILY_SPACES,
                   guidance: float = 1.0, batch_size: int = 64) -> dict:
    """eval.json for a latent family's Teacher and its exported student folder (module docstring): rows for the
    teacher and the student, the student's ratios to the teacher with paired significance, precision / recall."""
    from dstudio.distill.evaluation.card import card_header
    from dstudio.distill.evaluation.fingerprint import fingerprint
    from dstudio.distill.evaluation.spaces import feature_space

    condition = condition_inputs(teacher, condition_ids(teacher, n, prompts), prompts)
    refs = {}
    for s in spaces:
        space = feature_space(s, "cpu")
        refs[s] = Reference(space, family_reference(teacher, space, condition, n, ref, teacher_steps, guidance), {})
    rows, cards = [], {}
    for name, family, steps, w in (("teacher", stock_family(teacher), teacher_steps, guidance),
                                   ("student", student_family(teacher, student_dir), None, 1.0)):
        with torch.no_grad():
            images, seconds = draw(family, condition, n, NOISE_SEED, steps, w, batch_size)
        nfe = steps or getattr(family.pipeline.scheduler, "default_num_inference_steps", None) or 1
        row, cards[name] = score(name, nfe, images, seconds, refs)
        rows.append(row)
    vs_teacher(rows[1], rows[0], spaces)
    first = refs[spaces[0]].stats
    card = card_header(n, first.n, 0, teacher.num_classes > 0)
    card.update(per_class="skipped: per-class FID needs per-class reference statistics (the MNIST protocol's)",
                rows=cards)
    about = description(teacher, n, ref, teacher_steps, guidance)
    seeds = about["noise"]
    return {"features": spaces[0], "spaces": list(spaces), "n_generated": n, "reference": first.source,
            "protocol": about, "pipeline": type(teacher.pipeline).__name__,
            "fingerprint": {s: fingerprint(r.space, r.stats, n, about["conditions"], NOISE_SEED, seeds)
                            for s, r in refs.items()},
            "rows": rows, "card": card}
