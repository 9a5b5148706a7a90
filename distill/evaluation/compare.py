"""Teacher vs student on the embedded protocol (`RUN/eval.json`): FID in every space of SPACES and images/s,
measured in one run on the same noise. Class-conditional and unconditional pixel-space teachers alike."""
from __future__ import annotations

import torch

from dstudio.distill.evaluation.protocol import pipeline_images, protocol_inputs, protocol_reference

SPACES = ("mnist", "pixels")  # the digit classifier's space, and raw pixels (what it ignores: speckle, salt, texture)


def fid_key(space: str) -> str:
    """A row's key for the FID in `space`: `fid` for the first space (the one boards and reports read), else
    `fid_<space>`."""
    return "fid" if space == SPACES[0] else f"fid_{space}"


def references(resolution: int, spaces: tuple[str, ...] = SPACES) -> dict:
    """space name -> (its feature space, the MNIST-5k reference statistics at `resolution`)."""
    return {s: protocol_reference(s, resolution) for s in spaces}


def measure(name: str, pipe, steps: int | None, labels, noise, refs: dict, **sampling) -> dict:
    """One row: the pipeline's images on the protocol's noise (`sampling`: pipeline_images' batch_size, progress),
    their FID in each space of `refs`, and images/s."""
    from dstudio.distill.evaluation.fid import fid_of_tensor

    with torch.no_grad():
        images, seconds = pipeline_images(pipe, labels, noise, steps, **sampling)
    nfe = steps or getattr(pipe.scheduler, "default_num_inference_steps", None) or 1
    row = {"name": name, "nfe": nfe}
    for space_name, (space, ref) in refs.items():
        row[fid_key(space_name)] = fid_of_tensor(images, ref, space, name)["fid"]
    return {**row, "images_per_s": len(images) / seconds}


def compare(teacher_source, student_dir, per_class: int = 100, teacher_steps: int = 50,
            spaces: tuple[str, ...] = SPACES) -> dict:
    """Rows for the teacher at `teacher_steps` steps of its reference scheduler (DDIM, or its own Euler for flow
    matching) and the student with its own scheduler; the student's FIDs and speed also as ratios to the teacher's."""
    from dstudio.distill.core.teacher import load_pipeline, reference_scheduler

    teacher, student = load_pipeline(teacher_source), load_pipeline(student_dir)
    teacher.scheduler = reference_scheduler(teacher.scheduler)
    labels, noise = protocol_inputs(teacher, per_class)
    refs = references(noise.shape[-1], spaces)
    rows = [measure("teacher", teacher, teacher_steps, labels, noise, refs),
            measure("student", student, None, labels, noise, refs)]
    for s in spaces:
        rows[1][f"{fid_key(s)}_vs_teacher"] = rows[1][fid_key(s)] / rows[0][fid_key(s)]
    rows[1]["speedup"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return {"features": spaces[0], "spaces": list(spaces), "n_generated": len(labels),
            "reference": refs[spaces[0]][1].source, "rows": rows}


def fids_text(row: dict, spaces: list[str], ratios: bool = False) -> str:
    """`FID-mnist 0.0947 (1.84x the teacher), FID-pixels 2.31 (1.20x)`: each space, the first one first."""
    parts = []
    for i, s in enumerate(spaces):
        text = f"FID-{s} {row[fid_key(s)]:.4f}"
        if ratios:
            text += f" ({row[fid_key(s) + '_vs_teacher']:.2f}x{' the teacher' if i == 0 else ''})"
        parts.append(text)
    return ", ".join(parts)


def summary(result: dict) -> str:
    """Two lines: the teacher's FIDs and speed, then the student's with their ratios to the teacher."""
    t, s = result["rows"]
    spaces = result.get("spaces", [result["features"]])
    return (f"teacher ({t['nfe']} NFE): {fids_text(t, spaces)}, {t['images_per_s']:.0f} images/s\n"
            f"student ({s['nfe']} NFE): {fids_text(s, spaces, ratios=True)}, {s['images_per_s']:.0f} images/s "
            f"({s['speedup']:.1f}x faster)  [{result['n_generated']} images vs {result['reference']}]")
