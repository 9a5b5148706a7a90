"""MSD: partitions, routing (every class to exactly one student), TSM window, export as one routed pipeline."""
import pytest
import torch

from dstudio.distill.core.config import ConfigError
from dstudio.distill.core.method import Batch
from dstudio.distill.methods.msd import MSD, MSDConfig, check_partition, contiguous_partition


def test_contiguous_partition_gives_every_class_to_exactly_one_student():
    for k in (1, 2, 3, 4, 10):
        parts = contiguous_partition(10, k)
        assert len(parts) == k and sorted(c for p in parts for c in p) == list(range(10))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert contiguous_partition(10, 4) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    with pytest.raises(ConfigError, match="exactly one student"):
        check_partition([[0, 1], [1, 2]], 3)


def _msd(teacher, **kw):
    from dstudio.distill.data import digits8

    torch.manual_seed(0)
    kw = {"students": 3, **kw}
    cfg = MSDConfig(data="digits", lr_generator=1e-3, lr_critic=1e-3, head_width=8, **kw)
    return MSD(cfg, teacher=teacher, data=digits8(8))


def test_routing_uses_each_classes_own_student(teacher):
    m = _msd(teacher)
    labels = torch.arange(10)
    owner = m.route[labels]
    assert owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    seen = []

    def record(student, idx):
        seen.append(([i for i, s in enumerate(m.student) if s is student][0], idx.tolist()))
        return labels[idx].float().view(-1, 1)

    out = m.per_student(record, labels)
    assert out.view(-1).tolist() == labels.float().tolist()  # reassembled in batch order
    assert seen == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6, 7, 8, 9])]
    with pytest.raises(ConfigError, match="more than the teacher's 10 classes"):
        _msd(teacher, students=11)


def test_smaller_students_start_with_teacher_score_matching(teacher, tmp_path):
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8

    m = _msd(teacher, student_width=0.5, tsm_steps=2)
    n_teacher = sum(p.numel() for p in teacher.unet.parameters())
    n_student = sum(p.numel() for p in m.student[0].parameters())
    assert n_student < 0.5 * n_teacher
    active = {ph.name: [s for s in range(5) if ph.active(s)] for ph in m.phases()}
    assert active == {"tsm": [0, 1], "generator": [2], "critic": [2, 3, 4]}
    trainer = Trainer(m, TrainerConfig(steps=3, batch_size=12, sample_every=100), tmp_path, data=digits8(8))
    out = trainer.fit()

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.unet).__name__ == "RoutedUNet2DModel" and len(pipe.unet.students) == 3
    images = pipe(class_labels=list(range(10)), generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (10, 1, 8, 8)
    # the routed pipeline is the students: class c's image comes from the student that owns c
    with torch.no_grad(), trainer.ema.applied(m.student_net()):  # the export holds the EMA weights
        x = torch.randn(1, 1, 8, 8)
        direct = m.student[2].model(x, torch.tensor([999]), class_labels=torch.tensor([7])).sample
        routed = pipe.unet(x, torch.tensor([999]), class_labels=torch.tensor([7])).sample
    torch.testing.assert_close(routed, direct)


def test_per_student_critics_see_only_their_students_classes(teacher, tmp_path):
    """MSD's option of a fake score and GAN head per student: a batch of student 0's classes trains critic 0 only."""
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8

    m = _msd(teacher, critics="per_student", batches="split")  # the given batch, as it is
    assert len(m.fake_score.nets) == len(m.head) == 3
    data = digits8(8)
    trainer = Trainer(m, TrainerConfig(steps=1, batch_size=8, sample_every=100), tmp_path, data=data)
    mine = data.labels < 3  # classes 0, 1, 2 belong to student 0
    batch = Batch.of(data.images[mine][:8], data.labels[mine][:8])
    critic = m.phase("critic")
    before = [[p.detach().clone() for p in nn.parameters()] for nn in (*m.fake_score.nets, *m.head)]
    trainer.run_phase(critic, [batch])
    moved = [any(not torch.equal(a, b) for a, b in zip(snap, nn.parameters()))
             for snap, nn in zip(before, (*m.fake_score.nets, *m.head))]
    assert moved == [True, False, False, True, False, False]
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([9, 0, 4, 1, 8, 3])
    sigma = torch.full((6,), 2.0, dtype=torch.float64)
    with torch.no_grad():
        out = m.fake_score(x, sigma, m.cond(labels))
        for i, c in enumerate(labels.tolist()):  # every sample from its own student's critic
            own = m.fake_score.nets[int(m.route[c])](x[i:i + 1], sigma[i:i + 1], m.cond(labels[i:i + 1]))
            torch.testing.assert_close(out[i:i + 1], own)


def test_three_stage_recipe_adds_the_gan_after_distribution_matching(teacher, tmp_path):
    """MSD's smaller students: teacher score matching, then distribution matching alone, then with the GAN."""
    import json

    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8

    m = _msd(teacher, student_width=0.5, tsm_steps=1, dm_steps=2, critic_ratio=1)
    assert [m.gan_active(s) for s in range(5)] == [False, False, False, True, True]
    Trainer(m, TrainerConfig(steps=4, batch_size=12, sample_every=100, log_every=1), tmp_path,
            data=digits8(8)).fit(export=False)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    stages = [("tsm/tsm" in r, "generator/dm" in r, "critic/gan_d" in r) for r in logs]
    assert stages == [(True, False, False), (False, True, False), (False, True, False), (False, True, True)]
    with pytest.raises(ConfigError, match="leaves no adversarial stage"):
        Trainer(_msd(teacher, dm_steps=5), TrainerConfig(steps=4, batch_size=12), tmp_path / "b",
                data=digits8(8)).fit()


def test_each_student_gets_a_whole_batch_of_its_classes():
    """Song et al. 2024 train each student on its own classes: K x size images per micro-batch, block k of student
    k's classes, drawn from the run's random state (so a resume draws the same)."""
    from dstudio.distill.data import digits8
    from dstudio.distill.methods.msd import ClassBatches

    data = digits8(8)
    partition = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    source = ClassBatches(data, partition)
    torch.manual_seed(0)
    batch = source.next(5, "cpu")
    assert batch.size == 15
    for k, part in enumerate(partition):
        assert set(batch.labels[5 * k:5 * (k + 1)].tolist()) <= set(part)
    torch.manual_seed(0)
    assert torch.equal(source.next(5, "cpu").labels, batch.labels)
