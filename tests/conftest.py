import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny class-conditional DDPM teacher on sklearn's 8x8 digits, trained for a few steps by the Trainer."""
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8
    from dstudio.distill.methods.ddpm import DDPM, DDPMConfig

    torch.manual_seed(0)
    data = digits8(8)
    method = DDPM(DDPMConfig(data="digits", resolution=8, channels=(8, 16), grid_steps=2), data=data)
    run = tmp_path_factory.mktemp("tiny-teacher")
    cfg = TrainerConfig(steps=2, batch_size=16, sample_every=100, checkpoint_every=100)
    return Trainer(method, cfg, run, data=data).fit()


ZOO = {  # name: teacher training options (all on 8x8 digits, saved as DDPMPipeline folders)
    "eps-cosine-clip": dict(prediction_type="epsilon", beta_schedule="squaredcos_cap_v2", clip_sample=True),
    "v-zero-snr": dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, rescale_betas_zero_snr=True),
    "sample-linear": dict(prediction_type="sample", beta_schedule="linear"),
    "flow": dict(objective="flow_matching", flow_shift=2.0),
    "eps-uncond": dict(prediction_type="epsilon", beta_schedule="linear", conditional=False),
}


@pytest.fixture(scope="session")
def data():
    """sklearn's 8x8 digits, the fastest tests' data set."""
    from dstudio.distill.data import digits8

    return digits8(8)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, data):
    """Tiny zoo teachers trained for two steps each (seconds), as DDPMPipeline folders."""
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.methods.ddpm import DDPM, DDPMConfig

    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for name, options in ZOO.items():
        torch.manual_seed(0)
        cfg = DDPMConfig(data="digits", resolution=8, channels=(8, 16), grid_steps=2, layout="diffusers", **options)
        trainer = Trainer(DDPM(cfg, data=data), TrainerConfig(steps=2, batch_size=16, sample_every=100,
                                                              checkpoint_every=100), root / name, data=data)
        out[name] = trainer.fit()
    return out


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    """The tiny teacher loaded once per test module (a test that adapts the object it is given, as LoRA does, loads
    its own)."""
    from dstudio.distill.core.teacher import load_teacher

    return load_teacher(tiny_teacher)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny randomly initialised Stable-Diffusion-shaped pipeline (tests/tiny_sd.py), saved once as a folder."""
    from tiny_sd import tiny_sd_pipeline

    tmp = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="session")
def captioned_dir(tmp_path_factory):
    """Six random 16x16 RGB images with captions in metadata.jsonl (Hugging Face's imagefolder layout)."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    captions = ["a photo of a cat", "a red dog", "a blue cat", "a photo of digit one", "two dog", "a cat"]
    rows = []
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one state per process (a launch fixes its precision): reset around a test that sets its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def benchmark_script():
    """`benchmark_script("throughput")`: a script of benchmarks/ imported as a module (they are not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """tiny_family(name) -> the folder of a tiny `name` pipeline (tests/tiny_families.py), saved once per session."""
    from tiny_families import tiny_pipeline

    folders = {}

    def folder(name: str):
        if name not in folders:
            folders[name] = tiny_pipeline(name, tmp_path_factory.mktemp(name))[1]
        return folders[name]

    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: a second intra-op thread only adds overhead (ten times the time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
