"""The report card (issue 32, item 6): precision / recall (Kynkäänniemi et al. 2019) and per-class FID on fixed
Gaussian clusters whose answers the tests derive: identical sets, dropped modes, swapped labels, too few images."""
import numpy as np
import pytest

from dstudio.distill.evaluation.card import card_entry, card_header, class_fids, precision_recall
from dstudio.distill.evaluation.stats import Stats, frechet

D = 8


def _stats(x, name="x"):
    return Stats.of(x, "test", name)


def _clusters(rng, classes, per_class, centres):
    """Features of `per_class` draws around each centre of `classes` (unit spread), with their labels."""
    x = np.concatenate([centres[c] + rng.normal(size=(per_class, centres.shape[1])) for c in classes])
    return x, np.repeat(np.asarray(classes), per_class)


@pytest.fixture(scope="module")
def centres():
    return 12.0 * np.eye(10, D + 2)  # ten classes, far apart (distance 12 * sqrt(2) between any two)


def test_precision_recall_are_one_on_identical_sets_and_recall_falls_when_modes_drop(centres):
    rng = np.random.default_rng(7)
    real, _ = _clusters(rng, range(10), 100, centres)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    fresh, _ = _clusters(rng, range(10), 100, centres)  # the same distribution: what k-NN balls cover of a new draw
    base = precision_recall(real, fresh)
    dropped, _ = _clusters(rng, range(5), 200, centres)  # half the classes, as many images
    pr = precision_recall(real, dropped)
    assert pr["precision"] == pytest.approx(base["precision"], abs=0.05)
    assert pr["recall"] == pytest.approx(base["recall"] * 5 / 10, abs=0.05)
    with pytest.raises(ValueError, match="k=3 needs more than 3 features per set"):
        precision_recall(real[:3], fresh)


def test_swapped_labels_keep_the_global_fid_small_and_make_per_class_fids_large(centres):
    rng = np.random.default_rng(8)
    real, real_labels = _clusters(rng, range(10), 300, centres)
    class_refs = {c: _stats(real[real_labels == c], f"class {c}") for c in range(10)}
    fake, labels = _clusters(rng, range(10), 200, centres)
    swapped = (labels + 1) % 10  # each image carries its neighbour's label: the right digits for the wrong class
    global_fid = frechet(_stats(fake), _stats(real))
    right, wrong = class_fids(fake, labels, class_refs), class_fids(fake, swapped, class_refs)
    gap = np.sum((centres[0] - centres[1]) ** 2)  # FID between two unit clusters: their squared distance
    assert all(wrong[str(c)] == pytest.approx(gap, rel=0.1) for c in range(10))
    assert global_fid < 0.01 * gap and max(right.values()) < 0.01 * gap


def test_card_entries_skip_what_their_inputs_cannot_give(centres):
    rng = np.random.default_rng(9)
    real, real_labels = _clusters(rng, range(10), 30, centres)
    ref = _stats(real, "reference")
    class_refs = {c: _stats(real[real_labels == c]) for c in range(10)}
    fake, labels = _clusters(rng, range(10), 2, centres)
    entry = card_entry(fake, ref, labels, class_refs)
    assert set(entry["class_fid"]) == {str(c) for c in range(10)} and 0 <= entry["recall"] <= entry["precision"] <= 1
    assert card_entry(fake, ref)["class_fid"] is None  # unconditional: no labels
    assert card_entry(fake[::2], ref, labels[::2], class_refs)["class_fid"] is None  # one image per class
    assert card_header(20, 300, 2, conditional=False)["per_class"].startswith("skipped: an unconditional pipeline")
    assert card_header(10, 300, 1, conditional=True)["per_class"].startswith("skipped: per-class FID needs")
