"""Export of students and teachers as diffusers pipeline folders, with a provenance file."""
from __future__ import annotations

import datetime
import json
import platform
import shutil
from pathlib import Path

from dstudio.distill.core.io import atomic_path, save_json

PIPELINE_FILE = Path(__file__).with_name("pipeline_dstudio.py")
CUSTOM_CLASS = ["pipeline_dstudio", "DStudioPipeline"]
CUSTOM_COMPONENTS = {"RoutedUNet2DModel": Path(__file__).with_name("routed_unet.py")}


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import torch

    from importlib.metadata import version

    return {"dstudio": version("dstudio"), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def provenance(**extra) -> dict:
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "machine": platform.machine(), **extra}


def export_image_pipeline(unet, scheduler, path: str | Path, skips: dict | None = None, **info) -> Path:
    """Write `unet` + `scheduler` as a folder that plain `DiffusionPipeline.from_pretrained` loads and runs;
    `skips` ({"<timestep>": [block names]}, stage two of a search) are stored for the pipeline to apply."""
    from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        DStudioPipeline(unet=unet, scheduler=scheduler, skips=skips).save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = CUSTOM_CLASS
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        shutil.copy(PIPELINE_FILE, tmp / PIPELINE_FILE.name)
        custom = CUSTOM_COMPONENTS.get(type(unet).__name__)
        if custom:  # a component class of our own travels inside its folder (diffusers' custom components)
            shutil.copy(custom, tmp / "unet" / custom.name)
            index["unet"] = [custom.stem, type(unet).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        save_json(provenance(**info), tmp / "dstudio.json")
    return path


def export_text_pipeline(pipeline, unet, scheduler, path: str | Path, **info) -> Path:
    """Write a text-to-image student: the teacher pipeline's class and components with the student's unet and
    scheduler, loadable with `StableDiffusionPipeline.from_pretrained` (dstudio installed for its scheduler)."""
    import warnings

    path = Path(path)
    components = {**pipeline.components, "unet": unet, "scheduler": scheduler}
    with warnings.catch_warnings():  # "no safety checker": a tiny or user-provided pipeline may not have one
        warnings.simplefilter("ignore")
        student = type(pipeline)(**components)
    with atomic_path(path, is_dir=True) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        save_json(provenance(**info), tmp / "dstudio.json")
    return path
