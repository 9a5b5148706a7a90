"""The family x method matrix (#31): on every tiny family pipeline (tests/tiny_families.py) dmd2 and rectified_flow
run two steps through prepare_run (the CLI's assembly), sim and consistency (from the teacher) one, msd on the
class-conditional DiT, LoRA dmd2 on a transformer; every loss is finite, and every export, loaded in a process that
cannot import dstudio, draws the images of dstudio's own sampler on the same noise (1e-4 on [0, 1]; 5e-4 for flow
matching, whose pure-noise level dstudio reads at sigma 1e5: tests/test_families.py). `dstudio sample` draws from
every family folder, `dstudio distill` runs from the command line on one of them.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dstudio.distill.core.run import RunRequest, prepare_run
from test_exports import plain_diffusers_many
from tiny_families import FAMILIES

FLOW = ("sd3", "flux-schnell", "flux-dev")
DIT_CLASSES = (3, 700)  # the class folders' names: DiT's ImageNet ids (one in each of msd's two ranges)
TRAINER = ["trainer.batch_size=2", "trainer.sample_every=1000", "trainer.checkpoint_every=1000",
           "trainer.grid_per_class=1", "trainer.log_every=1"]
METHODS = {  # method -> (steps, overrides, options)
    "dmd2": (2, ["method.critic_ratio=1", "method.head_width=8"], {}),
    "rectified_flow": (2, ["method.num_pairs=4", "method.shard_size=4", "method.solver_steps=2",
                           "method.reflow_steps=1", "method.perceptual=none"], {}),
    "sim": (1, [], {}),
    "consistency": (1, [], {"init": "teacher"}),
}
RUNS = [(f, m) for f in FAMILIES for m in METHODS] + [("dit", "msd"), ("pixart_sigma", "dmd2-lora")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks, one intra-op thread


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    """Two class folders named by DiT ids, two random 16x16 RGB images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for c in DIT_CLASSES:
        (root / str(c)).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\nphoto of digit one\n")
    return path


def request_for(family, method, folder, out, data, prompts):
    """The RunRequest of one cell: the data (captions or DiT's class folders) and prompts each method takes."""
    name = "dmd2" if method == "dmd2-lora" else method
    steps, overrides, options = METHODS.get(name, (2, ["method.students=2", "method.head_width=8"], {}))
    overrides = [*TRAINER, *overrides] + (["method.lora_rank=2"] if method == "dmd2-lora" else [])
    cls_needs_data = name in ("dmd2", "consistency", "msd")
    if family != "dit" and not cls_needs_data:
        options = {**options, "prompts": str(prompts)}
    return RunRequest(name, out, str(folder), preset=None, data=str(data) if cls_needs_data else None,
                      overrides=overrides, options=options, steps=steps)


def reference(run, ids) -> torch.Tensor:
    """dstudio's own images of the trained student (its EMA weights, as exported), ids into its condition table."""
    m, gen = run.method.eval(), torch.Generator().manual_seed(0)
    with torch.no_grad(), run.trainer.ema.applied(m.student_net()):
        return (m.sample(torch.tensor(ids), gen) / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def trained(tiny_family, captioned_dir, class_dir, prompts_file, tmp_path_factory):
    """Every cell of the matrix trained once: (family, method) -> its run, log, reference images and pipeline call."""
    root, cells = tmp_path_factory.mktemp("matrix"), {}
    for family, method in RUNS:
        data = class_dir if family == "dit" else captioned_dir
        run = prepare_run(request_for(family, method, tiny_family(family), root / f"{family}-{method}", data,
                                      prompts_file))
        run.fit()
        ids = [0, 1]
        labels = list(DIT_CLASSES) if family == "dit" else None
        prompts = None if labels else [run.method.prompts[i] for i in ids]
        call = {**run.teacher.family.call_inputs(2, prompts, labels), "num_inference_steps": 1}  # CFG off: w = 1
        cells[family, method] = SimpleNamespace(run=run, ref=reference(run, labels or ids), call=call,
                                                log=(run.out / "log.jsonl").read_text())
    return cells


@pytest.mark.parametrize("family,method", RUNS)
def test_every_phase_runs_with_finite_losses(trained, family, method):
    cell = trained[family, method]
    rows = [json.loads(line) for line in cell.log.splitlines()]
    for phase in cell.run.trainer.phases:
        if phase.active(0) or phase.active(1):
            assert any(k.startswith(f"{phase.name}/") for row in rows for k in row), phase.name
    assert all(np.isfinite(v) for row in rows for k, v in row.items() if "/" in k)
    assert cell.ref.shape == (2, 3, 16, 16) and torch.isfinite(cell.ref).all()


def test_exports_draw_dstudios_images_without_dstudio(trained, tmp_path):
    """Every export is the family's own pipeline class; plain diffusers loads and runs it with dstudio blocked."""
    classes = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
               "sd3": "StableDiffusion3Pipeline", "flux-schnell": "FluxPipeline", "flux-dev": "FluxPipeline",
               "pixart_sigma": "PixArtSigmaPipeline", "dit": "DiTPipeline"}
    keys = list(trained)
    got = plain_diffusers_many(tmp_path, [{"pipeline": str(trained[k].run.out / "pipeline"),
                                           "calls": [(0, trained[k].call)]} for k in keys])
    for (family, method), result in zip(keys, got):
        assert result["pipeline"] == classes[family], (family, method)
        images = result["images"][0]
        images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images  # DiTPipeline: numpy (B, H, W, C)
        torch.testing.assert_close(images, trained[family, method].ref, atol=5e-4 if family in FLOW else 1e-4,
                                   rtol=0, msg=lambda m: f"{family} {method}: {m}")


def test_msd_on_dit_routes_the_classes_and_lora_trains_adapters_on_a_transformer(trained):
    msd = trained["dit", "msd"].run.method
    assert len(msd.student) == 2 and msd.partition == [list(range(500)), list(range(500, 1000))]
    index = json.loads((trained["dit", "msd"].run.out / "pipeline" / "model_index.json").read_text())
    assert index["transformer"] == ["routed_unet", "RoutedUNet2DModel"]
    lora = trained["pixart_sigma", "dmd2-lora"].run.method
    adapted = list(lora.student.model.adapter)  # module paths, dots as "__"
    for target in ("attn1__to_q", "attn2__to_v", "attn1__to_out__0", "ff__net__0__proj", "ff__net__2"):
        assert any(p.endswith(target) for p in adapted), target
    assert all(".lora_" in n for n, _ in lora.student.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_cli_draws_from_every_family(tiny_family, family, tmp_path):
    from dstudio.app.cli import main

    condition = ["--class", "7"] if family == "dit" else ["--prompt", "a red cat"]
    assert main(["sample", "--pipeline", str(tiny_family(family)), *condition, "--steps", "2", "--num-images", "2",
                 "--guidance", "2", "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 2


def test_distill_cli_on_a_transformer_family(tiny_family, captioned_dir, tmp_path, capsys):
    from dstudio.app.cli import main

    out = tmp_path / "run"
    assert main(["distill", "dmd2", "--teacher", str(tiny_family("sd3")), "--data", str(captioned_dir),
                 "--preset", "quick", "--steps", "1", *sum((["--set", o] for o in TRAINER), []),
                 "--set", "method.head_width=8", "--eval-per-class", "1", "--out", str(out)]) == 0
    assert (out / "pipeline" / "model_index.json").is_file() and "Traceback" not in capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())  # a latent teacher's eval: its data folder as reference
    assert result["pipeline"] == "StableDiffusion3Pipeline" and result["reference"] == str(captioned_dir)
    assert [r["name"] for r in result["rows"]] == ["teacher", "student"] and result["n_generated"] == 10
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 0  # reads it as the MNIST eval.json
    assert main(["search", "--teacher", str(tiny_family("dit")), "--nfe", "2", "--skip-blocks",
                 "--out", str(tmp_path / "s")]) == 2  # time steps are searched on every family (test_family_search.py)
    assert "--skip-blocks searches the blocks of a pixel-space UNet" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_pixel_unet_methods_refuse_other_families_in_one_line(tiny_family, method, tmp_path):
    """scm and meanflow wrap a pixel UNet2DModel: a transformer or latent teacher is refused before training."""
    from dstudio.distill.core.config import ConfigError

    request = RunRequest(method, tmp_path / "run", str(tiny_family("dit")), preset=None, data=None,
                         overrides=list(TRAINER), options={}, steps=1)
    with pytest.raises(ConfigError, match=f"^{method} trains pixel-space UNet2DModel teachers .*is a DiT"):
        prepare_run(request)
