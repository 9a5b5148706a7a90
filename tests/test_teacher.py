"""Teacher loading: pixel DDPM pipelines, SD-shaped latent text-to-image pipelines, clear refusals."""

import pytest
import torch

from dstudio.app.cli import main
from dstudio.distill.core.teacher import TeacherError, load_teacher, teacher_from_pipeline
from tiny_sd import tiny_sd_pipeline


def test_class_teacher(tiny_teacher):
    t = load_teacher(tiny_teacher)
    assert type(t.family).__name__ == "PixelUNet" and not t.takes_prompts
    assert (t.num_classes, t.sample_shape) == (10, (1, 8, 8))
    x = torch.randn(2, 1, 8, 8) * 10
    out = t.guided(3.0)(x, torch.tensor([10.0, 10.0]), t.cond(torch.tensor([1, 2])))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in t.unet.parameters())
    with pytest.raises(TeacherError, match="class 11 is outside the teacher's labels 0..9"):
        t.check_class(11)


def test_latent_text_teacher(tiny_sd_dir):
    t = load_teacher(tiny_sd_dir)
    assert t.takes_prompts and t.num_classes == 0 and t.sample_shape == (4, 8, 8)
    cond = t.conditions(["a photo of digit one", "red cat"])
    assert cond.embeds.shape == (2, 8, 16) and t.null_cond.embeds.shape == (1, 8, 16)
    x = torch.randn(2, 4, 8, 8)
    x0 = t.guided(4.0)(x * 5, 5.0, cond)
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert t.decode(x0).shape == (2, 3, 16, 16)


def test_v_prediction_latent_teacher(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path, prediction_type="v_prediction")
    t = teacher_from_pipeline(pipe)
    assert t.denoiser.prediction_type == "v_prediction"


def test_sample_cli_with_text_pipeline(tiny_sd_dir, tmp_path, capsys):
    assert main(["sample", "--pipeline", str(tiny_sd_dir), "--prompt", "a red cat", "--steps", "2",
                 "--num-images", "2", "--guidance", "3", "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 2
    assert main(["sample", "--pipeline", str(tiny_sd_dir), "--steps", "2", "--out", str(tmp_path / "p")]) == 2
    assert "is text-to-image: give --prompt" in capsys.readouterr().err


def test_unsupported_pipelines_are_named(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(TeacherError, match="corrupt model_index.json"):
        load_teacher(folder)

    class NoUnet:
        pass

    with pytest.raises(TeacherError, match="unsupported pipeline NoUnet.*supported: DDPMPipeline-style"):
        teacher_from_pipeline(NoUnet())

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.scheduler.register_to_config(prediction_type="bogus")
    with pytest.raises(TeacherError, match="unsupported pipeline StableDiffusionPipeline.*prediction_type 'bogus'"):
        teacher_from_pipeline(pipe)


def test_hub_id_without_network_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="could not load pipeline 'nobody/no-such-model'"):
        load_teacher("nobody/no-such-model")
