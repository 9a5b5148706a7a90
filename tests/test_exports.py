"""Every folder dstudio writes loads with plain diffusers in a process that cannot import dstudio, and draws the
images of dstudio's own sampler on the same noise (tolerance: 1e-4 on images in [0, 1]; the shipped classes run
the same arithmetic, so only float summation order differs between the two processes)."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from dstudio.distill.core.trainer import Trainer, TrainerConfig
from dstudio.distill.data import digits8

ATOL = 1e-4
LABELS = [0, 3, 7, 9]

# Run in a fresh interpreter from an empty folder: every import of dstudio (or of the repository's old top-level
# names) fails, so whatever loads must come from diffusers and the files inside the exported folder.
PLAIN = textwrap.dedent('''
    import sys

    class BlockDstudio:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("dstudio", "distill", "samplers", "search", "app"):
                raise ImportError(f"import of {name} blocked: this process runs without dstudio")

    sys.meta_path.insert(0, BlockDstudio())
    try:
        import dstudio
        raise SystemExit("the block failed: dstudio imported")
    except ImportError:
        pass
    import json
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import get_class_from_dynamic_module

    def run(spec):
        pipe = DiffusionPipeline.from_pretrained(spec["pipeline"], trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        if "scheduler" in spec:  # a scheduler folder: its class travels in the folder as a custom module
            config = json.load(open(spec["scheduler"] + "/scheduler_config.json"))
            cls = get_class_from_dynamic_module(spec["scheduler"], spec["module"], class_name=config["_class_name"],
                                                trust_remote_code=True)
            pipe.scheduler = cls.from_pretrained(spec["scheduler"])
        images = [torch.as_tensor(pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="pt").images)
                  for seed, call in spec["calls"]]
        classes = {k: type(v).__module__ + "." + type(v).__name__ for k, v in pipe.components.items() if v is not None}
        return {"images": images, "classes": classes, "pipeline": type(pipe).__name__}

    spec = json.loads(sys.argv[1])
    results = [run(s) for s in spec.get("runs", [spec])]  # several folders in one process: "runs"
    assert not [m for m in sys.modules if m.split(".")[0] == "dstudio"]
    torch.save(results if "runs" in spec else results[0], spec["out"])
''')


def plain_diffusers(tmp_path, pipeline, *calls, **extra) -> dict:
    """Load `pipeline` in a subprocess where dstudio cannot be imported, run each (seed, pipeline kwargs) call on
    it, return the images of each call and the classes that loaded."""
    return _plain(tmp_path, {"pipeline": str(pipeline), "calls": calls, **extra})


def plain_diffusers_many(tmp_path, runs: list[dict]) -> list[dict]:
    """plain_diffusers for several {"pipeline", "calls"} in one subprocess (one interpreter start for all)."""
    return _plain(tmp_path, {"runs": runs})


def _plain(tmp_path, spec: dict):
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir(exist_ok=True)
    out = run_dir / "out.pt"
    spec = {**spec, "out": str(out)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf-modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(spec)], cwd=run_dir, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_same_images(plain, ref):
    """`ref` in [-1, 1] from dstudio's sampler; the pipeline's images are in [0, 1]."""
    torch.testing.assert_close(plain, (ref / 2 + 0.5).clamp(0, 1), atol=ATOL, rtol=0)


def _fit(method, run, steps=1, **cfg):
    trainer = Trainer(method, TrainerConfig(steps=steps, batch_size=8, sample_every=100, checkpoint_every=100,
                                            **cfg), run, data=digits8(8))
    return trainer, trainer.fit()


def _reference(trainer, seed=0, labels=LABELS, **kw):
    m = trainer.method.eval()  # as a loaded pipeline: no dropout (iCT trains with it)
    with trainer.ema.applied(m.student_net()), torch.no_grad():  # the export holds the EMA weights
        return m.sample(torch.tensor(labels), torch.Generator().manual_seed(seed), **kw)


def test_dmd2_one_step_student(teacher, tmp_path):
    from dstudio.distill.methods.dmd2 import DMD2, DMD2Config

    torch.manual_seed(0)
    m = DMD2(DMD2Config(data="digits", num_steps=1, critic_ratio=1, head_width=8), teacher=teacher, data=digits8(8))
    trainer, folder = _fit(m, tmp_path / "run")
    got = plain_diffusers(tmp_path, folder, (0, {"class_labels": LABELS}))
    assert got["pipeline"] == "DStudioPipeline" and got["classes"]["scheduler"].endswith("schedulers.StudentScheduler")
    assert_same_images(got["images"][0], _reference(trainer))


def test_consistency_few_step_student(teacher, tmp_path):
    from dstudio.distill.methods.consistency import Consistency, ConsistencyConfig

    torch.manual_seed(0)
    m = Consistency(ConsistencyConfig(data="digits"), teacher=teacher)
    trainer, folder = _fit(m, tmp_path / "run", grid_per_class=1)
    # one step by default; two re-noise with the generator's next draw, as sample_multistep does
    got = plain_diffusers(tmp_path, folder, (1, {"class_labels": LABELS}),
                          (2, {"class_labels": LABELS, "num_inference_steps": 2}))
    for steps in (1, 2):
        assert_same_images(got["images"][steps - 1], _reference(trainer, seed=steps, steps=steps))


def test_rectified_flow_student(teacher, tmp_path):
    from dstudio.distill.core.config import from_dict
    from dstudio.distill.methods.rectified_flow import RectifiedFlow

    torch.manual_seed(0)
    cfg = {"num_pairs": 16, "shard_size": 8, "solver_steps": 2, "reflow_steps": 1, "perceptual": "none"}
    m = RectifiedFlow(from_dict(RectifiedFlow.Config, cfg), teacher=teacher)
    trainer, folder = _fit(m, tmp_path / "run", steps=2, grid_per_class=1)
    got = plain_diffusers(tmp_path, folder, *[(n, {"class_labels": LABELS, "num_inference_steps": n}) for n in (1, 2)])
    assert got["classes"]["scheduler"].endswith("schedulers.FlowEulerScheduler")
    for steps in (1, 2):
        assert_same_images(got["images"][steps - 1], _reference(trainer, seed=steps, steps=steps))


def test_msd_routed_students(teacher, tmp_path):
    from dstudio.distill.methods.msd import MSD, MSDConfig

    torch.manual_seed(0)
    m = MSD(MSDConfig(data="digits", students=3, head_width=8, tsm_steps=0), teacher=teacher, data=digits8(8))
    trainer, folder = _fit(m, tmp_path / "run")
    got = plain_diffusers(tmp_path, folder, (0, {"class_labels": LABELS}))
    assert got["classes"]["unet"].endswith("routed_unet.RoutedUNet2DModel")
    assert_same_images(got["images"][0], _reference(trainer))


def test_searched_schedule(tiny_teacher, teacher, tmp_path):
    """`dstudio search` writes a scheduler folder whose class travels inside it; plugged into the (plain) teacher
    it is dstudio's DPM-Solver++ on the searched steps."""
    from dstudio.app.cli import main
    from dstudio.samplers import append_zero, sample_dpmpp_2m

    out = tmp_path / "search"
    assert main(["search", "--teacher", str(tiny_teacher), "--nfe", "3", "--num-samples", "20", "--population", "4",
                 "--generations", "1", "--top-k", "2", "--solver", "dpmpp-2m", "--out", str(out)]) == 0
    steps = json.loads((out / "search.json").read_text())["best"]["steps"]
    got = plain_diffusers(tmp_path, tiny_teacher, (3, {"class_labels": LABELS}), scheduler=str(out / "scheduler"),
                          module="schedulers.py")
    sigmas = append_zero(teacher.denoiser.t_to_sigma(torch.tensor(steps)))
    z = torch.randn(len(LABELS), *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = sample_dpmpp_2m(teacher.denoiser, z * (1 + sigmas[0] ** 2).sqrt(), sigmas, torch.tensor(LABELS))
    assert_same_images(got["images"][0], ref.clamp(-1, 1))


def test_text_to_image_student(tiny_sd_dir, captioned_dir, tmp_path):
    """DMD2 on the tiny Stable-Diffusion pipeline: the export is a StableDiffusionPipeline whose scheduler travels
    in the folder; prompts are the captions the student trained on."""
    from dstudio.distill.core.teacher import load_teacher
    from dstudio.distill.data import image_folder
    from dstudio.distill.methods.dmd2 import DMD2, DMD2Config

    teacher = load_teacher(tiny_sd_dir)
    data = teacher.to_model_space(image_folder(captioned_dir, resolution=16, channels=3))
    torch.manual_seed(0)
    m = DMD2(DMD2Config(critic_ratio=1, head_width=8), teacher=teacher, data=data)
    trainer = Trainer(m, TrainerConfig(steps=1, batch_size=4, sample_every=100), tmp_path / "run", data=data)
    folder = trainer.fit()
    labels = [0, 2]
    got = plain_diffusers(tmp_path, folder, (0, {"prompt": [data.captions[i] for i in labels], "guidance_scale": 1.0}))
    assert got["pipeline"] == "StableDiffusionPipeline"
    assert got["classes"]["scheduler"].endswith("schedulers.StudentScheduler")
    assert_same_images(got["images"][0], _reference(trainer, labels=labels))


def test_shipped_files_are_the_package_modules(teacher, tmp_path):
    """Exports copy the package's own modules at write time; the shipped teacher's pipeline file is that same file."""
    from dstudio.distill.core import pipeline_dstudio
    from dstudio.distill.core.export import export_image_pipeline, module_files
    from dstudio.distill.core.teacher import DEFAULT_TEACHER
    from dstudio.samplers import StudentScheduler, scheduler_from_teacher

    sched = scheduler_from_teacher(StudentScheduler, teacher.scheduler, timesteps=[999])
    folder = export_image_pipeline(teacher.unet, sched, tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dstudio", "DStudioPipeline"]
    assert index["scheduler"] == ["schedulers", "StudentScheduler"] and index["unet"] == ["diffusers", "UNet2DModel"]
    shipped = module_files("dstudio.samplers.schedulers")
    assert sorted(p.name for p in shipped) == ["samplers.py", "schedulers.py", "schedules.py"]
    for path in shipped:
        assert (folder / "scheduler" / path.name).read_bytes() == path.read_bytes()
    source = open(pipeline_dstudio.__file__, "rb").read()
    assert (folder / "pipeline_dstudio.py").read_bytes() == source
    assert (DEFAULT_TEACHER / "pipeline_dstudio.py").read_bytes() == source


def test_stage_two_pipeline_with_skips(tiny_teacher, teacher, tmp_path):
    """A stage-two search result (per-step skipped blocks) loads without dstudio and draws what dstudio's loader
    draws from the same folder (which tests/test_search.py checks against the search's own skipping sampler)."""
    from dstudio.app.search_cli import export_skip_pipeline
    from dstudio.distill.core.teacher import load_pipeline
    from dstudio.samplers import SearchedScheduler, scheduler_from_teacher
    from dstudio.search.skip import skippable_blocks
    from dstudio.search.space import Candidate

    names = skippable_blocks(teacher.unet)
    c = Candidate((999, 600, 300), (frozenset(names[:2]), frozenset(), frozenset(names[2:3])), "unipc-2")
    sched = scheduler_from_teacher(SearchedScheduler, teacher.scheduler, timesteps=list(c.steps), solver=c.solver)
    folder = export_skip_pipeline(teacher, c, sched, tmp_path / "pipeline")
    got = plain_diffusers(tmp_path, folder, (4, {"class_labels": LABELS}))
    assert got["classes"]["scheduler"].endswith("SearchedScheduler") and not got["classes"]["scheduler"].startswith("dstudio")
    ref = load_pipeline(folder)(class_labels=LABELS, generator=torch.Generator().manual_seed(4), output_type="pt").images
    torch.testing.assert_close(got["images"][0], ref, atol=ATOL, rtol=0)
    unskipped = load_pipeline(folder)
    unskipped.register_to_config(skips=None)
    plain = unskipped(class_labels=LABELS, generator=torch.Generator().manual_seed(4), output_type="pt").images
    assert not torch.allclose(got["images"][0], plain, atol=1e-3)  # the skips were applied
