"""The Compare tab's model: the pipelines the page can sample (found under the runs folder, loaded once, with the
reason when they cannot load) and one row of images per pipeline on shared noise, with the speed it measured."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dstudio.app.studio.safety import check
from dstudio.distill.core.pipeline_dstudio import classes_of
from dstudio.distill.evaluation.protocol import timed

MAX_STEPS = 100           # sampling steps in Compare (the slider's end)
MAX_IMAGES = 16           # images per pipeline in Compare
MAX_ROWS = 6              # pipelines compared at once
READABLE = 128            # tiny images are upscaled (nearest neighbour) to at least this many pixels


@dataclass
class Entry:
    """One pipeline the app can sample: the teacher, an exported student, or the teacher with a saved schedule."""

    name: str
    path: Path
    kind: str                     # "teacher", "student" or "schedule"
    scheduler_dir: Path | None = None
    error: str | None = None      # why it is unavailable
    _pipe: object = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.error is None

    def pipeline(self):
        if self._pipe is None:
            from dstudio.app.schedulers import load_scheduler
            from dstudio.distill.core.teacher import load_pipeline

            pipe = load_pipeline(self.path)
            if self.scheduler_dir is not None:
                pipe.scheduler = load_scheduler(str(self.scheduler_dir))
            self._pipe = pipe
        return self._pipe

    def method(self) -> str:
        """The method that made it: the run's dstudio.json for students."""
        if self.kind != "student":
            return {"teacher": "teacher", "schedule": "searched schedule"}[self.kind]
        from dstudio.distill.core.export import read_provenance

        return read_provenance(self.path).get("method") or self.kind


def find_pipelines(runs: str | Path | None, teachers: tuple[Path, ...] = ()) -> list[Entry]:
    """The shipped teacher and the --teacher folders, then every pipeline folder and saved schedule under `runs`
    (unloadable ones included, with the reason they cannot be used)."""
    from dstudio.distill.core.teacher import DEFAULT_TEACHER

    entries = [Entry("teacher", DEFAULT_TEACHER, "teacher")]
    entries += [Entry(f"teacher:{t.name}", t, "teacher") for t in teachers]
    if runs is not None and Path(runs).is_dir():
        root = Path(runs).resolve()
        for index in sorted(root.rglob("model_index.json")):
            folder = index.parent
            if folder.resolve().is_relative_to(root) and folder.resolve() not in teachers:
                entries.append(Entry(str(folder.relative_to(root)), folder, "student"))
        for config in sorted(root.rglob("scheduler_config.json")):
            folder = config.parent
            if (folder.parent / "model_index.json").is_file() or not folder.resolve().is_relative_to(root):
                continue  # a pipeline's own scheduler
            entries.append(Entry(f"teacher + {folder.relative_to(root)}", DEFAULT_TEACHER, "schedule", folder))
    for e in entries[1:]:
        try:
            e.pipeline()
        except Exception as err:  # listed as unavailable with its reason; the rest still works
            e.error = str(err).splitlines()[0] if str(err) else type(err).__name__
    return entries


def readable(img):
    """A tiny image upscaled by a whole factor with nearest neighbour, so each pixel stays a crisp square."""
    from PIL import Image

    factor = math.ceil(READABLE / min(img.width, img.height))
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor > 1 else img


@dataclass
class Row:
    """One Compare row: a pipeline's images on the shared noise and what that run measured."""

    name: str
    method: str
    nfe: int
    seconds_per_image: float
    images: list

    def label(self, first: "Row") -> str:
        speedup = first.seconds_per_image / max(self.seconds_per_image, 1e-12)
        return (f"{self.name} · {self.method} · {self.nfe} NFE · {self.seconds_per_image:.4g} s/image · "
                f"{speedup:.2f}x the speed of {first.name}")


def _condition(entry: Entry, pipe, class_label: int | None, prompt: str, num_images: int) -> dict:
    """The pipeline call's condition: prompts, class labels, or a batch size for unconditional pipelines."""
    if hasattr(pipe, "tokenizer"):
        check(bool(prompt.strip()), f"pipeline '{entry.name}' is text-to-image: give a prompt")
        return {"prompt": [prompt] * num_images}
    n_cls = classes_of(pipe.unet.config.num_class_embeds)
    if n_cls <= 0:
        return {"batch_size": num_images}
    label = 0 if class_label is None else int(class_label)
    check(0 <= label < n_cls, f"class {label} is outside this pipeline's classes 0..{n_cls - 1}")
    return {"class_labels": torch.full((num_images,), label)}


def sample_row(entry: Entry, class_label: int | None, prompt: str, seed: int, steps: int, guidance: float,
               num_images: int) -> Row:
    """`num_images` images of one pipeline from the noise that `seed` draws (the same for every pipeline)."""
    check(entry.available, f"pipeline '{entry.name}' is unavailable: {entry.error}")
    pipe = entry.pipeline()
    unet = pipe.unet
    kwargs = {"guidance_scale": float(guidance), "output_type": "pil",
              **_condition(entry, pipe, class_label, prompt, num_images)}
    if steps:
        kwargs["num_inference_steps"] = int(steps)
    size = unet.config.sample_size
    kwargs["latents"] = torch.randn((num_images, unet.config.in_channels, size, size),
                                    generator=torch.Generator().manual_seed(seed))
    kwargs["generator"] = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        out, seconds = timed(pipe, **kwargs)
    return Row(entry.name, entry.method(), len(pipe.scheduler.timesteps), seconds / len(out.images),
               [readable(img) for img in out.images])
