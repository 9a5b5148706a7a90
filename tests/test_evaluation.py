"""The end-of-run comparison (RUN/eval.json): both feature spaces per row with their ratios to the teacher, on
class-conditional and unconditional teachers, through the one protocol wrapper for pipelines without labels."""
import pytest
import torch

from dstudio.distill.evaluation.compare import SPACES, compare, fid_key, summary
from dstudio.distill.evaluation.protocol import Unconditional, pipeline_images, protocol_pipeline


@pytest.fixture(scope="module")
def uncond_teacher(tmp_path_factory):
    """A tiny unconditional DDPM teacher (a DDPMPipeline folder), trained for two steps."""
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8
    from dstudio.distill.methods.ddpm import DDPM, DDPMConfig

    torch.manual_seed(0)
    data = digits8(8)
    cfg = DDPMConfig(data="digits", resolution=8, channels=(8, 16), grid_steps=2, layout="diffusers",
                     prediction_type="epsilon", beta_schedule="linear", conditional=False)
    cfg_t = TrainerConfig(steps=2, batch_size=16, sample_every=100, checkpoint_every=100)
    return Trainer(DDPM(cfg, data=data), cfg_t, tmp_path_factory.mktemp("uncond"), data=data).fit()


def _check_rows(result):
    from dstudio.distill.evaluation.interval import BOOTSTRAP_B, significant

    teacher, student = result["rows"]
    assert result["spaces"] == list(SPACES) == ["mnist", "pixels"] and result["features"] == "mnist"
    for row in (teacher, student):
        assert {fid_key(s) for s in SPACES} == {"fid", "fid_pixels"} <= set(row)
        for s in SPACES:
            lo, hi = row[f"{fid_key(s)}_ci95"]
            assert lo <= row[fid_key(s)] <= hi and len(row[f"{fid_key(s)}_boot"]) == BOOTSTRAP_B
    for s in SPACES:
        key = fid_key(s)
        assert student[f"{key}_vs_teacher"] == pytest.approx(student[key] / teacher[key])
        assert student[f"{key}_vs_teacher_significant"] == significant(student, teacher, key, paired=True)
        fp = result["fingerprint"][s]
        assert fp["features"] == s and fp["n_generated"] == 20 and fp["noise_seed"] == 0
        assert fp["reference"] == "mnist5k@8px" and (fp["weights_sha256"] is None) == (s == "pixels")
    assert student["speedup"] == pytest.approx(student["images_per_s"] / teacher["images_per_s"])


@pytest.mark.parametrize("which", ["class", "uncond"])
def test_compare_reports_both_spaces_with_ratios(which, tiny_teacher, uncond_teacher):
    folder = tiny_teacher if which == "class" else uncond_teacher
    result = compare(folder, folder, per_class=2, teacher_steps=2)
    assert result["n_generated"] == 20 and [r["name"] for r in result["rows"]] == ["teacher", "student"]
    _check_rows(result)
    card = result["card"]
    assert card["k"] == 3 and set(card["rows"]) == {"teacher", "student"}
    for entry in (e[s] for e in card["rows"].values() for s in SPACES):
        assert 0 <= entry["precision"] <= 1 and 0 <= entry["recall"] <= 1
        assert (entry["class_fid"] is None) == (which == "uncond")
        assert entry["class_fid"] is None or set(entry["class_fid"]) == {str(c) for c in range(10)}
    assert card["per_class"].startswith("skipped: an unconditional") == (which == "uncond")
    teacher_line, student_line, card_line = summary(result).splitlines()
    assert teacher_line.startswith("teacher (2 NFE): FID-mnist ") and ", FID-pixels " in teacher_line
    assert student_line.index("FID-mnist") < student_line.index("FID-pixels")
    assert "[20 images vs mnist5k@8px]" in student_line and "x the teacher" in student_line
    assert card_line.startswith("precision / recall (mnist, k=3): teacher ")


def test_a_loaded_teacher_pipeline_is_measured_as_its_folder(tiny_teacher):
    """A run's own float32 teacher pipeline is compared without loading it again: the same teacher row as its
    folder gives, and the pipeline handed in keeps its scheduler."""
    from dstudio.distill.core.teacher import load_pipeline

    pipe = load_pipeline(tiny_teacher)
    before = pipe.scheduler
    by_folder, by_pipeline = (compare(src, tiny_teacher, per_class=1, teacher_steps=2) for src in (tiny_teacher, pipe))
    assert pipe.scheduler is before
    for key in ("fid", "fid_pixels"):
        assert by_pipeline["rows"][0][key] == pytest.approx(by_folder["rows"][0][key], rel=1e-5)


def test_eval_json_reaches_the_report_and_the_board(tiny_teacher, tmp_path):
    """A run's eval.json: interval cells, precision / recall and the per-class table in the HTML report; the same
    rows on the FID board, marked as the end-of-run comparison's paired rule says."""
    from dstudio.app.report import build_report
    from dstudio.app.studio.board import fid_rows, mark_not_significant
    from dstudio.distill.core.io import save_json

    run = tmp_path / "runs" / "same"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method_name: dmd2\n")
    result = compare(tiny_teacher, tiny_teacher, per_class=2, teacher_steps=2)
    save_json(result, run / "eval.json")
    page = build_report([str(run)], tmp_path / "report.html").read_text()
    teacher = result["rows"][0]
    lo, hi = teacher["fid_ci95"]
    assert f"<td>teacher</td><td>2</td><td>{teacher['fid']:.4g} [{lo:.3g}, {hi:.3g}]</td>" in page
    assert "report card" in page and "FID class 9" in page and "protocol fingerprint: mnist (weights " in page
    rows = [r for r in fid_rows(tmp_path / "runs") if r["source"] == "same"]
    assert [r["row"] for r in rows] == ["teacher", "student"] and rows[1]["method"] == "dmd2"
    assert rows[0]["precision"] == round(result["card"]["rows"]["teacher"]["mnist"]["precision"], 3)
    marks = {r["row"]: r["not_significant_vs"] for r in mark_not_significant(rows)}
    same = not result["rows"][1]["fid_vs_teacher_significant"]  # the board applies eval.json's paired rule
    assert marks == ({"teacher": "student", "student": "teacher"} if same else {"teacher": "-", "student": "-"})


def test_unconditional_pipelines_are_called_with_a_batch_size(uncond_teacher):
    from dstudio.distill.core.teacher import load_pipeline

    pipe = load_pipeline(uncond_teacher)
    wrapped = protocol_pipeline(pipe)
    assert isinstance(wrapped, Unconditional) and protocol_pipeline(wrapped) is wrapped
    wrapped.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    assert pipe.scheduler is wrapped.scheduler  # one scheduler: set on the wrapper, used by the pipeline
    images, _ = pipeline_images(pipe, torch.arange(3), torch.randn(3, 1, 8, 8), 2)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_unconditional_reference_draws_class_counts_as_an_unconditional_teacher_does(benchmark_script):
    """benchmarks/teachers.py holds unconditional zoo teachers to the shipped teacher on multinomial class counts."""
    label_draws = benchmark_script("teachers").label_draws
    draws = label_draws(1000, 150, draws=5)
    assert len(draws) == 5
    for idx in draws:
        counts = torch.bincount(idx // 150, minlength=10)
        assert counts.sum() == 1000 and len(set(idx.tolist())) == 1000
        assert not (counts == 100).all()  # not the balanced protocol
        assert all((idx[idx // 150 == c] % 150 < counts[c]).all() for c in range(10))  # each class's first ones
    assert not torch.equal(draws[0], draws[1])
    assert all(torch.equal(a, b) for a, b in zip(draws, label_draws(1000, 150, draws=5)))  # seeded


def test_class_imbalance_is_zero_for_balanced_digits_and_high_for_one(benchmark_script):
    from dstudio.distill.data import mnist5k
    from dstudio.distill.evaluation.spaces import feature_space

    class_imbalance, space = benchmark_script("teachers").class_imbalance, feature_space("mnist", "cpu")
    data = mnist5k(16)
    images, labels = data.images, data.labels
    balanced = torch.cat([images[labels == c][:20] for c in range(10)])
    assert class_imbalance(balanced, space) < 0.15
    assert class_imbalance(images[labels == 3][:200], space) > 0.8
