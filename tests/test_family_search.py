"""`dstudio search` and the end-of-run comparison on latent teachers (#31): tiny PixArt-Sigma (text, transformer) and
DiT (class labels) pipelines are searched through the same Denoiser core and FID fitness as pixel teachers, against
the teacher's own many-step images in the `pixels` space; the searched SearchedScheduler, plugged into the family's
own pipeline, draws the images the fitness scored on the same noise.
"""
import json

import pytest
import torch
from diffusers import DiffusionPipeline

from dstudio.app.cli import main
from dstudio.samplers import SearchedScheduler
from test_families import CLASSES, FLOW
from tiny_families import FAMILIES

PROMPTS = ["a red cat", "photo of digit one", "a blue dog"]
SEARCH = ["--nfe", "2", "--num-samples", "4", "--screen-samples", "4", "--population", "3", "--generations", "1",
          "--top-k", "2", "--ref-steps", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks, one intra-op thread


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def search(folder, out, *args) -> dict:
    assert main(["search", "--teacher", str(folder), "--out", str(out), *SEARCH, *args]) == 0
    return json.loads((out / "search.json").read_text())


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    """Four random 16x16 RGB images (a user's --ref FOLDER)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def pipeline_draws(folder, scheduler_dir, fitness) -> torch.Tensor:
    """The family's own pipeline with the searched scheduler, called with the family's call inputs on the fitness's
    conditions and noise (FLUX: packed latents; DiTPipeline, which takes none, the generator that drew them)."""
    from diffusers import FluxPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SearchedScheduler.from_pretrained(scheduler_dir)
    t, z = fitness.teacher, fitness.noise
    labels = fitness.labels.tolist() if t.num_classes else None
    prompts = [PROMPTS[i] for i in fitness.labels.tolist()] if t.takes_prompts else None
    if isinstance(pipe, FluxPipeline):
        noise = {"latents": FluxPipeline._pack_latents(z, *z.shape)}
    else:
        noise = {"generator": torch.Generator().manual_seed(fitness.noise_seed)} if labels else {"latents": z}
    images = pipe(**t.family.call_inputs(len(z), prompts, labels), **noise, output_type="pt").images
    return torch.as_tensor(images).permute(0, 3, 1, 2) if images.shape[-1] == 3 else images  # DiT: numpy (B, H, W, C)


@pytest.mark.parametrize("family", FAMILIES)
def test_search_on_every_family_plugs_into_its_own_pipeline(tiny_family, family, prompts_file, ref_folder, tmp_path):
    """The fitness scores the images the searched SearchedScheduler draws in the family's own pipeline (1e-4 on
    [0, 1]; flow matching 5e-4: tests/test_families.py); the default reference is the teacher's own images."""
    from dstudio.app.search_cli import FIDFitness
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.search.space import Candidate

    folder, text = tiny_family(family), family != "dit"
    record = search(folder, tmp_path / "s", *(["--prompts", str(prompts_file)] if text else ["--ref", str(ref_folder)]))
    assert record["features"] == "pixels" and record["pipeline"] == CLASSES[family]
    scheduler = type(load_teacher(folder).family.fixed_scheduler()).__name__
    assert record["reference"] == (f"teacher '{folder}' at 4 steps of {scheduler if family in FLOW else 'DDIMScheduler'}"
                                   f", noise seed 2000" if text else str(ref_folder))
    fitness = FIDFitness(load_teacher(folder), 4, features="pixels", ref=str(ref_folder),
                         prompts=PROMPTS if text else None)
    ref = fitness.images(Candidate.from_json(record["best"])) / 2 + 0.5
    got = pipeline_draws(folder, tmp_path / "s" / "scheduler", fitness)
    torch.testing.assert_close(got, ref, atol=5e-4 if family in FLOW else 1e-4, rtol=0)


@pytest.mark.parametrize("family, args, message", [
    ("pixart_sigma", [], "is text-to-image: give --prompts FILE"),
    ("dit", ["--prompts", "PROMPTS"], "--prompts is for text-to-image teachers;"),
    ("dit", ["--skip-blocks"], "blocks of a pixel-space UNet; this teacher is a DiTPipeline"),
    ("sd15", ["--prompts", "nope.txt"], "prompts file 'nope.txt' does not exist"),
    ("dit", ["--ref", "mnist"], "--ref mnist is the embedded digits of pixel-space teachers;"),
])
def test_search_bad_input_on_latent_teachers(tiny_family, prompts_file, family, args, message, tmp_path, capsys):
    args = [str(prompts_file) if a == "PROMPTS" else a for a in args]
    assert main(["search", "--teacher", str(tiny_family(family)), "--out", str(tmp_path / "s"), *SEARCH, *args]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err  # above it: diffusers' loading bars


def test_compare_on_a_latent_family_measures_the_student_against_the_teachers_own_images(tiny_family, tmp_path):
    """compare() on an SD 1.5 folder and a "student" (its own UNet with a two-step searched schedule): both drawn
    through StableDiffusionPipeline on the same prompts and noise, against the teacher's own 50-step images."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.evaluation.compare import compare, summary
    from dstudio.samplers import scheduler_from_teacher

    folder = tiny_family("sd15")
    teacher = load_teacher(folder)
    sched = scheduler_from_teacher(SearchedScheduler, teacher.family.fixed_scheduler(), timesteps=[999, 499])
    student = teacher.export(teacher.network, sched, tmp_path / "student")
    result = compare(str(folder), student, per_class=1, prompts=PROMPTS)
    teacher_row, student_row = result["rows"]
    assert result["pipeline"] == "StableDiffusionPipeline" and result["n_generated"] == 10
    assert result["features"] == "pixels" and result["reference"].startswith(f"teacher '{folder}' at 50 steps")
    assert "sampling floor" in result["protocol"]["reference"]
    assert (teacher_row["name"], teacher_row["nfe"], student_row["nfe"]) == ("teacher", 50, 2)
    assert student_row["fid_vs_teacher"] == pytest.approx(student_row["fid"] / teacher_row["fid"])  # fid: pixels
    assert isinstance(student_row["fid_vs_teacher_significant"], bool) and student_row["speedup"] > 0
    assert "student (2 NFE): FID-pixels" in summary(result)
    with pytest.raises(ValueError, match="is text-to-image: give --prompts FILE"):
        compare(str(folder), student, per_class=1)


def test_pixels_space_reads_colour_images_of_any_size():
    """The latent families' default space: RGB of any size and aspect, channels averaged, each side at most 32."""
    from dstudio.distill.evaluation.spaces import feature_space, tensor_features

    space = feature_space("pixels", "cpu")
    images = torch.rand(3, 3, 48, 20) * 2 - 1
    feats = tensor_features(images, space)
    assert feats.shape == (3, 32 * 20)
    grey = images.mean(1, keepdim=True)
    expected = torch.nn.functional.interpolate(((grey + 1) * 127.5) / 255, size=(32, 20), mode="area").flatten(1)
    assert abs(feats - expected.numpy()).max() < 1 / 255  # uint8 quantisation before the channel mean


def test_a_pixel_teacher_can_be_searched_against_its_own_images(tiny_teacher, tmp_path):
    record = search(tiny_teacher, tmp_path / "s", "--ref", "teacher", "--features", "pixels")
    assert record["reference"] == f"teacher '{tiny_teacher}' at 4 steps of DDIMScheduler, noise seed 2000"
    assert record["features"] == "pixels" and record["pipeline"] == "DStudioPipeline"
