"""Teacher vs student on the embedded protocol (`RUN/eval.json`): FID with its 95% interval in every space of SPACES,
whether the student differs from the teacher (paired bootstrap), images/s measured in one run on the same noise, the
protocol fingerprint of each space, and the report card (precision / recall, per-class FID). Class-conditional and
unconditional pixel-space teachers alike."""
from __future__ import annotations

from typing import NamedTuple

import torch

from dstudio.distill.evaluation.protocol import NUM_CLASSES, is_conditional, pipeline_images, protocol_fingerprint, \
    protocol_inputs, protocol_reference
from dstudio.distill.evaluation.spaces import FeatureSpace
from dstudio.distill.evaluation.stats import Stats

SPACES = ("mnist", "pixels")  # the digit classifier's space, and raw pixels (what it ignores: speckle, salt, texture)


class Reference(NamedTuple):
    """A feature space with the MNIST-5k statistics in it: all of them, and each class's."""

    space: FeatureSpace
    stats: Stats
    classes: dict[int, Stats]


def fid_key(space: str, spaces=SPACES) -> str:
    """A row's key for the FID in `space`: `fid` for the first of the comparison's `spaces` (the one boards and
    reports read), else `fid_<space>`."""
    return "fid" if space == spaces[0] else f"fid_{space}"


def references(resolution: int, spaces: tuple[str, ...] = SPACES) -> dict[str, Reference]:
    """space name -> its Reference: the feature space and the MNIST-5k statistics at `resolution` (cached)."""
    from dstudio.distill.evaluation.stats import mnist_class_reference

    out = {}
    for s in spaces:
        space, stats = protocol_reference(s, resolution)
        out[s] = Reference(space, stats, mnist_class_reference(space, resolution))
    return out


def score(name: str, nfe: int, images: torch.Tensor, seconds: float, refs: dict[str, Reference],
          class_labels=None) -> tuple[dict, dict]:
    """One row and its card for images in [-1, 1] drawn in `seconds`: in each space of `refs` their FID with its
    interval and bootstrap replicates (the row) and their precision / recall and, given class labels and per-class
    references, per-class FID (the card, space -> entry); images/s."""
    from dstudio.distill.evaluation.card import card_entry
    from dstudio.distill.evaluation.fid import fid_of_features
    from dstudio.distill.evaluation.interval import fid_fields
    from dstudio.distill.evaluation.spaces import tensor_features

    row, card = {"name": name, "nfe": nfe}, {}
    for space_name, ref in refs.items():
        feats = tensor_features(images, ref.space)
        key = fid_key(space_name, tuple(refs))
        row.update(fid_fields(fid_of_features(feats, ref.stats, ref.space, name), key))
        card[space_name] = card_entry(feats, ref.stats, class_labels, ref.classes)
    return {**row, "images_per_s": len(images) / seconds}, card


def measure(name: str, pipe, steps: int | None, labels, noise, refs: dict[str, Reference],
            **sampling) -> tuple[dict, dict]:
    """One row and its card (`score`) of the pipeline's images on the protocol's noise (`sampling`:
    pipeline_images' batch_size, progress)."""
    with torch.no_grad():
        images, seconds = pipeline_images(pipe, labels, noise, steps, **sampling)
    nfe = steps or getattr(pipe.scheduler, "default_num_inference_steps", None) or 1
    return score(name, nfe, images, seconds, refs, labels.numpy() if is_conditional(pipe) else None)


def vs_teacher(s_row: dict, t_row: dict, spaces) -> dict:
    """The student's FIDs and speed as ratios to the teacher's, with `KEY_vs_teacher_significant` from the paired
    bootstrap (both drew from the same noise)."""
    from dstudio.distill.evaluation.interval import significant

    for s in spaces:
        key = fid_key(s, spaces)
        s_row[f"{key}_vs_teacher"] = s_row[key] / t_row[key]
        s_row[f"{key}_vs_teacher_significant"] = significant(s_row, t_row, key, paired=True)
    s_row["speedup"] = s_row["images_per_s"] / t_row["images_per_s"]
    return s_row


def compare(teacher_source, student_dir, per_class: int = 100, teacher_steps: int = 50,
            spaces: tuple[str, ...] = SPACES, prompts: list[str] | None = None) -> dict:
    """`teacher_source`: a folder, or a loaded float32 pipeline (a run's teacher, not loaded again; its scheduler
    is left as it is). Rows for the teacher at `teacher_steps` steps of its reference scheduler (DDIM, or its own Euler for flow
    matching) and the student with its own scheduler; the student's FIDs and speed also as ratios to the teacher's,
    with `KEY_vs_teacher_significant` from the paired bootstrap (both drew from the same noise). A latent family's
    teacher (SD, SDXL, SD3, FLUX, PixArt, DiT; `prompts` for text ones) is compared by family_compare on
    `per_class` x 10 images against its own images."""
    from dstudio.distill.core.family import family_of
    from dstudio.distill.core.teacher import load_pipeline, reference_scheduler
    from dstudio.distill.evaluation.card import card_header

    from diffusers import DiffusionPipeline

    given = isinstance(teacher_source, DiffusionPipeline)
    teacher = teacher_source if given else load_pipeline(teacher_source)
    if not family_of(teacher).pixel_space:
        from dstudio.distill.core.teacher import teacher_from_pipeline
        from dstudio.distill.evaluation.family_compare import compare_family

        source = teacher.name_or_path if given else str(teacher_source)
        return compare_family(teacher_from_pipeline(teacher, source), student_dir, per_class * NUM_CLASSES,
                              prompts, teacher_steps)
    if given:
        teacher = type(teacher)(**teacher.components)  # shares the modules, not the scheduler slot
    teacher.set_progress_bar_config(disable=True)
    teacher.scheduler, student = reference_scheduler(teacher.scheduler), load_pipeline(student_dir)
    labels, noise = protocol_inputs(teacher, per_class)
    refs = references(noise.shape[-1], spaces)
    (t_row, t_card), (s_row, s_card) = (measure("teacher", teacher, teacher_steps, labels, noise, refs),
                                        measure("student", student, None, labels, noise, refs))
    vs_teacher(s_row, t_row, spaces)
    first = refs[spaces[0]].stats
    card = card_header(len(labels), first.n, len(labels) // NUM_CLASSES, is_conditional(teacher))
    card["rows"] = {"teacher": t_card, "student": s_card}
    return {"features": spaces[0], "spaces": list(spaces), "n_generated": len(labels), "reference": first.source,
            "fingerprint": {s: protocol_fingerprint(r.space, r.stats, per_class) for s, r in refs.items()},
            "rows": [t_row, s_row], "card": card}


def figure_text(row: dict, key: str) -> str:
    """`0.0947 [0.0901, 0.1012]`: a row's FID under `key` with its 95% interval when it has one."""
    ci = row.get(f"{key}_ci95")
    return f"{row[key]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def fids_text(row: dict, spaces: list[str], ratios: bool = False) -> str:
    """`FID-mnist 0.0947 [0.0901, 0.1012] (1.84x the teacher), FID-pixels 2.31 [2.25, 2.38] (1.20x, not
    significant)`: each space, the first one first, with its interval; ratios marked when not significant."""
    parts = []
    for i, s in enumerate(spaces):
        key = fid_key(s, spaces)
        text = f"FID-{s} {figure_text(row, key)}"
        if ratios:
            ns = ", not significant" if row.get(f"{key}_vs_teacher_significant") is False else ""
            text += f" ({row[key + '_vs_teacher']:.2f}x{' the teacher' if i == 0 else ''}{ns})"
        parts.append(text)
    return ", ".join(parts)


def card_text(card: dict, space: str) -> str:
    """`precision / recall (mnist, k=3): teacher 0.91 / 0.88, student 0.93 / 0.61`."""
    def pr(entry):
        return "n/a" if entry.get("precision") is None else f"{entry['precision']:.2f} / {entry['recall']:.2f}"

    rows = ", ".join(f"{name} {pr(spaces[space])}" for name, spaces in card["rows"].items() if space in spaces)
    return f"precision / recall ({space}, k={card['k']}): {rows}"


def summary(result: dict) -> str:
    """The teacher's FIDs and speed, the student's with their ratios to the teacher, and (with a card) precision /
    recall in the first space."""
    t, s = result["rows"]
    spaces = result.get("spaces", [result["features"]])
    lines = [f"teacher ({t['nfe']} NFE): {fids_text(t, spaces)}, {t['images_per_s']:.0f} images/s",
             f"student ({s['nfe']} NFE): {fids_text(s, spaces, ratios=True)}, {s['images_per_s']:.0f} images/s "
             f"({s['speedup']:.1f}x faster)  [{result['n_generated']} images vs {result['reference']}]"]
    if result.get("card"):
        lines.append(card_text(result["card"], spaces[0]))
    return "\n".join(lines)
