"""The shipped teacher: a diffusers folder that loads, and draws readable digits of the class it is asked for."""
import json

import torch

from dstudio.distill.evaluation.features import load_feature_net
from dstudio.distill.core.teacher import DEFAULT_TEACHER, load_teacher


def test_shipped_teacher_is_a_plain_diffusers_folder():
    index = json.loads((DEFAULT_TEACHER / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dstudio", "DStudioPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    t = load_teacher()
    assert (t.num_classes, t.takes_prompts, t.sample_shape) == (10, False, (1, 16, 16))


def test_shipped_teacher_draws_the_asked_class():
    """20 DDIM steps, 5 images per class; the digit classifier (98% held-out) must read >= 90% of them right."""
    pipe = load_teacher().pipeline
    labels = torch.arange(10).repeat_interleave(5)
    images = pipe(class_labels=labels, num_inference_steps=20, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    with torch.no_grad():
        pred = load_feature_net().logits(images * 255).argmax(1)
    accuracy = (pred == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy


def test_shipped_teacher_with_a_searched_scheduler(tmp_path):
    """The README snippet on the shipped teacher: a stored 4-step list is what the pipeline runs."""
    from dstudio.samplers import SearchedScheduler, scheduler_from_teacher

    pipe = load_teacher().pipeline
    scheduler_from_teacher(SearchedScheduler, pipe.scheduler, timesteps=[999, 700, 400, 150]).save_pretrained(tmp_path)
    pipe.scheduler = SearchedScheduler.from_pretrained(tmp_path)
    images = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and pipe.scheduler.timesteps.tolist() == [999, 700, 400, 150]
