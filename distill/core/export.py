"""Export of students, teachers and schedules as diffusers folders, with a provenance file.

Every dstudio class inside an exported folder (the pipeline, a routed UNet, a scheduler) travels as its own
source file: `ship_class` copies the module that defines it, and the sibling modules it imports relatively,
next to the component's config and names it in model_index.json, so plain diffusers loads the folder with
`trust_remote_code=True` in a process that cannot import dstudio. The copies are the package's own files,
written at export time; a shipped module may import only torch, numpy, diffusers and its relative siblings.
"""
from __future__ import annotations

import ast
import datetime
import importlib
import importlib.util
import json
import platform
import shutil
import sys
from pathlib import Path

from dstudio.distill.core.io import atomic_path, save_json

CUSTOM_CLASS = ["pipeline_dstudio", "DStudioPipeline"]
SHIPPING_PACKAGES = ("dstudio.distill.core", "dstudio.samplers", "dstudio.search")  # where shipped modules live


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


def read_provenance(folder: str | Path) -> dict:
    """The dstudio.json a folder dstudio wrote holds (see provenance); {} where it has none or it is unreadable."""
    try:
        card = json.loads((Path(folder) / "dstudio.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return card if isinstance(card, dict) else {}


def is_dstudio_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "dstudio"


def module_files(module_name: str) -> list[Path]:
    """The source file of `module_name` and, recursively, of the sibling modules it imports relatively."""
    files, todo = [], [Path(sys.modules[module_name].__file__ if module_name in sys.modules
                            else importlib.util.find_spec(module_name).origin)]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.append(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(path.with_name(node.module.split(".")[0] + ".py"))
    return files


def ship_class(cls: type, folder: str | Path) -> list[str]:
    """Copy the module defining `cls` (and its relative imports) into `folder`; return its model_index.json entry."""
    files = module_files(cls.__module__)
    for path in files:
        shutil.copyfile(path, Path(folder) / path.name)
    return [files[0].stem, cls.__name__]


def shipped_module(folder: str | Path, stem: str) -> str | None:
    """The dstudio module a file `stem`.py shipped in `folder` came from (None if the folder ships no such file)."""
    if not (Path(folder) / f"{stem}.py").is_file():
        return None
    for package in SHIPPING_PACKAGES:
        if importlib.util.find_spec(f"{package}.{stem}") is not None:
            return f"{package}.{stem}"
    return None


def ship_classes(pipeline, folder: Path) -> None:
    """Make a saved pipeline folder self-contained: every dstudio class in it travels as its source file."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if is_dstudio_class(type(pipeline)):  # a custom pipeline class lives at the folder's root
        index["_class_name"] = ship_class(type(pipeline), folder)
    for name, component in pipeline.components.items():
        if component is not None and is_dstudio_class(type(component)):  # diffusers' custom components
            index[name] = ship_class(type(component), folder / name)
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def export_pipeline(pipeline, path: str | Path, lora=None, **info) -> Path:
    """Write `pipeline` as a folder that plain `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` loads;
    a LoRA student's adapter (an AdapterView) also goes to `path/lora/`, for `load_lora_weights` on the teacher."""
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        ship_classes(pipeline, tmp)
        if lora is not None:
            from dstudio.distill.core.lora import save_lora

            save_lora(lora, tmp / "lora")
        save_json(provenance(**info), tmp / "dstudio.json")
    return path


def _unet_and_lora(unet):
    """A LoRA student's fused backbone and its adapter view; any other backbone as it is, and None."""
    from dstudio.distill.core.lora import AdapterView, fused_unet

    return fused_unet(unet), (unet if isinstance(unet, AdapterView) else None)


def export_image_pipeline(unet, scheduler, path: str | Path, skips: dict | None = None, **info) -> Path:
    """Write `unet` + `scheduler` as a class-conditional (or unconditional) DStudioPipeline folder; `skips`
    ({"<timestep>": [block names]}, stage two of a search) are stored for the pipeline to apply."""
    from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

    unet, lora = _unet_and_lora(unet)
    return export_pipeline(DStudioPipeline(unet=unet, scheduler=scheduler, skips=skips), path, lora=lora, **info)


def export_text_pipeline(pipeline, unet, scheduler, path: str | Path, **info) -> Path:
    """Write a text-to-image student: the teacher pipeline's class and components with the student's unet and
    scheduler (also how a teacher travels with a searched schedule: pass its own unet)."""
    import warnings

    unet, lora = _unet_and_lora(unet)
    components = {**pipeline.components, "unet": unet, "scheduler": scheduler}
    with warnings.catch_warnings():  # "no safety checker": a tiny or user-provided pipeline may not have one
        warnings.simplefilter("ignore")
        student = type(pipeline)(**components)
    return export_pipeline(student, path, lora=lora, **info)


def save_scheduler(scheduler, path: str | Path) -> Path:
    """Write a scheduler folder; a dstudio scheduler's class travels with it as its source file."""
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        scheduler.save_pretrained(tmp)
        if is_dstudio_class(type(scheduler)):
            ship_class(type(scheduler), tmp)
    return path
