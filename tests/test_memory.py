"""Memory levers: gradient checkpointing (same gradients, LoRA views included), frozen weights in bf16, and a text
teacher's conditions (prompt embeddings, VAE latents) computed once, never per step."""
import pytest
import torch

from dstudio.distill.core.memory import enable_gradient_checkpointing
from dstudio.distill.core.method import Batch
from dstudio.distill.core.teacher import load_teacher
from dstudio.distill.data import digits8
from dstudio.distill.methods.dmd2 import DMD2, DMD2Config


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # conftest.py


def _dmd2(tiny_teacher, rank):
    torch.manual_seed(0)
    m = DMD2(DMD2Config(data="digits", head_width=8, lora_rank=rank), teacher=load_teacher(tiny_teacher),
             data=digits8(8))
    with torch.no_grad():  # adapters that are not the identity, so a recompute without them would differ
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m


def _grads(m, phase):
    torch.manual_seed(1)
    batch = Batch.of(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    m.train_only(m.phase(phase))
    m.zero_grad(set_to_none=True)
    m.phase(phase).loss(batch, 0)[0].backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rank", [0, 4])
def test_gradient_checkpointing_keeps_the_gradients(tiny_teacher, rank):
    m = _dmd2(tiny_teacher, rank)
    want = {phase: _grads(m, phase) for phase in ("critic", "generator")}
    assert enable_gradient_checkpointing(m) == (1 if rank else 2)  # LoRA: the one shared base
    for phase, grads in want.items():
        got = _grads(m, phase)
        assert got.keys() == grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(got[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_weights_in_bf16_under_mixed_precision(tiny_teacher, tmp_path):
    from dstudio.distill.core.config import ConfigError, from_dict
    from dstudio.distill.core.trainer import Trainer, TrainerConfig

    with pytest.raises(ConfigError, match="frozen_dtype"):
        from_dict(TrainerConfig, {"frozen_dtype": "bf16"})
    m = _dmd2(tiny_teacher, 4)
    cfg = TrainerConfig(steps=2, batch_size=4, mixed_precision="bf16", frozen_dtype="auto", gradient_checkpointing=True,
                        sample_every=100, grid_per_class=1)
    trainer = Trainer(m, cfg, tmp_path / "run", data=digits8(8))
    base = m.student.model.base
    frozen = [p for n, p in base.named_parameters() if ".lora_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in m.student_net().parameters())  # the optimiser's weights
    assert all(p.dtype == torch.float32 for p in m.head.parameters())
    folder = trainer.fit()
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet")
    assert next(unet.parameters()).dtype == torch.float32


def test_text_teacher_conditions_are_computed_once(tiny_sd_dir, captioned_dir):
    """DMD2 on a text teacher encodes its captions and real images once, at construction; its steps never call the
    text encoder or the VAE encoder again."""
    from dstudio.distill.data import image_folder

    teacher = load_teacher(tiny_sd_dir)
    data = teacher.to_model_space(image_folder(captioned_dir, resolution=16, channels=3))
    m = DMD2(DMD2Config(critic_ratio=1, head_width=8, lora_rank=2), teacher=teacher, data=data)
    calls = []
    for module in (teacher.pipeline.text_encoder, teacher.pipeline.vae.encoder):
        module.register_forward_hook(lambda *a, name=type(module).__name__: calls.append(name))
    batch = Batch.of(data.images[:2], torch.tensor([0, 1]))
    for phase in ("generator", "critic"):
        m.phase(phase).loss(batch, 0)[0].backward()
    assert calls == []


def test_memory_benchmark_accounting_counts_the_adapters(benchmark_script):
    from diffusers import UNet2DConditionModel

    from dstudio.distill.core.lora import DEFAULT_TARGETS, LoraOptions, adapter_view

    bench = benchmark_script("memory")
    unet = UNet2DConditionModel(**bench.TINY_UNET)
    view = adapter_view(unet, "student", LoraOptions(lora_rank=4))
    assert bench.lora_parameter_count(unet.__class__(**bench.TINY_UNET), 4, DEFAULT_TARGETS) == \
        sum(p.numel() for p in view.parameters())
    sd15 = bench.accounting(bench.SD15_UNET, 64)
    assert sd15["unet_parameters"] == 859_520_964  # SD 1.5's UNet
    assert sd15["lora_gb"] < 0.4 * sd15["full_gb"]


def test_memory_benchmark_smoke(benchmark_script, tmp_path):
    """--tiny runs a variant in a capped subprocess and records it; a variant over its cap is recorded as failed."""
    bench = benchmark_script("memory")
    ok = bench.main(["--tiny", "--steps", "1", "--variants", "lora", "--rank", "4", "--out", str(tmp_path / "m.json")])
    (row,) = ok["rows"]
    assert row["name"] == "lora" and row["status"] == "ok", row
    assert 0 < row["trainable_parameters"] < row["total_parameters"] and row["peak_rss_gb"] > 0
    failed = bench.main(["--tiny", "--steps", "1", "--variants", "full", "--cap-gb", "0.3",
                         "--out", str(tmp_path / "f.json")])
    (row,) = failed["rows"]
    assert row["status"] == "failed" and row["reason"] and any("failed under" in n for n in failed["notes"])
