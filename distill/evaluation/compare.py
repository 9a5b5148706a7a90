"""Teacher vs student on the embedded protocol: FID-mnist and images/s measured in one run."""
from __future__ import annotations

import torch

from dstudio.distill.evaluation.protocol import pipeline_images, protocol_for


def compare(teacher_source, student_dir, per_class: int = 100, teacher_steps: int = 50) -> dict:
    """Rows for the teacher at `teacher_steps` DDIM steps and the student with its own scheduler."""
    from dstudio.distill.evaluation.fid import fid_of_tensor
    from dstudio.distill.core.teacher import load_pipeline, reference_scheduler

    teacher = load_pipeline(teacher_source)
    student = load_pipeline(student_dir)
    proto = protocol_for(teacher, per_class, floor=False)
    labels, noise, space, ref = proto["labels"], proto["noise"], proto["space"], proto["ref"]
    teacher.scheduler = reference_scheduler(teacher.scheduler)
    rows = []
    for name, pipe, steps in (("teacher", teacher, teacher_steps), ("student", student, None)):
        with torch.no_grad():
            images, seconds = pipeline_images(pipe, labels, noise, steps)
        nfe = steps or getattr(pipe.scheduler, "default_num_inference_steps", None) or 1
        fid = fid_of_tensor(images, ref, space, name)["fid"]
        rows.append({"name": name, "nfe": nfe, "fid": fid, "images_per_s": len(images) / seconds})
    rows[1]["fid_vs_teacher"] = rows[1]["fid"] / rows[0]["fid"]
    rows[1]["speedup"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return {"features": "mnist", "n_generated": len(labels), "reference": ref.source, "rows": rows}


def summary(result: dict) -> str:
    t, s = result["rows"]
    return (f"teacher ({t['nfe']} NFE): FID-mnist {t['fid']:.4f}, {t['images_per_s']:.0f} images/s\n"
            f"student ({s['nfe']} NFE): FID-mnist {s['fid']:.4f} ({s['fid_vs_teacher']:.2f}x the teacher), "
            f"{s['images_per_s']:.0f} images/s ({s['speedup']:.1f}x faster)  "
            f"[{result['n_generated']} images vs {result['reference']}]")
