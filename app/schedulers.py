"""Schedulers the CLI and the app put into a pipeline: the stock diffusers ones by name, and saved folders."""
from __future__ import annotations

from pathlib import Path

from dstudio.app.errors import UsageError

# The stock diffusers schedulers `dstudio sample --scheduler NAME` offers: name -> class.
STOCK_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def load_scheduler(folder: str):
    """A scheduler folder written by save_pretrained: dstudio's own classes or any diffusers scheduler."""
    import json

    import diffusers

    from dstudio import samplers

    path = Path(folder)
    config = path / "scheduler_config.json"
    if not config.is_file():
        raise UsageError(f"scheduler folder '{folder}' has no scheduler_config.json")
    try:
        name = json.loads(config.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"scheduler folder '{folder}' has a corrupt scheduler_config.json") from None
    cls = getattr(samplers, name, None) or getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UsageError(f"scheduler class '{name}' in '{folder}' is neither a dstudio nor a diffusers scheduler")
    try:
        return cls.from_pretrained(path)
    except ValueError as e:
        raise UsageError(f"scheduler folder '{folder}': {e}") from None
