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
