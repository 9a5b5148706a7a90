"""FID you can trust (issue 32, item 5): the bootstrap interval, the significance rule, the protocol fingerprint,
the interval cells of the results tables and the FID board's marks, on fixed Gaussian features whose answers the
tests derive."""
import hashlib

import numpy as np
import pytest

from dstudio.distill.evaluation.interval import BOOTSTRAP_B, fid_interval, fid_replicates, resample_indices, \
    significant
from dstudio.distill.evaluation.stats import Stats, frechet, frechet_psd, psd_sqrt

D = 8


def _stats(x, name="x"):
    return Stats.of(x, "test", name)


def _row(x, ref, name="row"):
    """An FID result row of features `x` against `ref`: the figure, its interval and its replicates."""
    fid = frechet(_stats(x), ref)
    return {"name": name, "fid": fid, **fid_interval(fid, x, ref)}


@pytest.fixture(scope="module")
def ref():
    return _stats(np.random.default_rng(0).normal(size=(4000, D)), "reference")


def test_fast_frechet_and_replicates_match_clean_fids_distance_on_the_resampled_sets(ref):
    x = np.random.default_rng(1).normal(size=(300, D)) * 1.2 + 0.3
    assert frechet_psd(x.mean(0), np.cov(x, rowvar=False), ref, psd_sqrt(ref.sigma)) == \
        pytest.approx(frechet(_stats(x), ref), rel=1e-7)
    reps = fid_replicates(x, ref, b=3, seed=5)
    by_hand = [frechet(_stats(x[idx]), ref) for idx in resample_indices(len(x), 3, 5)]
    np.testing.assert_allclose(reps, by_hand, rtol=1e-7)


def test_interval_contains_the_figure_and_shrinks_with_more_images(ref):
    x = np.random.default_rng(2).normal(size=(2000, D)) + 0.2
    widths = {}
    for n in (200, 2000):
        row = _row(x[:n], ref)
        lo, hi = row["fid_ci95"]
        assert lo <= row["fid"] <= hi and len(row["fid_boot"]) == BOOTSTRAP_B
        widths[n] = hi - lo
    assert widths[2000] < 0.6 * widths[200]  # the spread falls about as 1 / sqrt(n): sqrt(200 / 2000) = 0.32


def test_at_the_floor_the_shifted_interval_keeps_the_figure_that_the_plain_percentiles_miss(ref):
    """Resampling with replacement repeats images, so every replicate of a real-vs-real figure lies above it."""
    x = np.random.default_rng(3).normal(size=(1000, D))
    row = _row(x, ref)
    assert np.percentile(row["fid_boot"], 2.5) > row["fid"]
    assert row["fid_ci95"][0] <= row["fid"] <= row["fid_ci95"][1] and row["fid_ci95"][0] >= 0


def test_significant_says_no_for_one_distribution_and_yes_for_a_shifted_one(ref):
    z = np.random.default_rng(4).normal(size=(2000, D))  # "noise": row i of every set below comes from z[i]
    other = np.random.default_rng(5).normal(size=(2000, D))
    shift = np.eye(D)[0]
    base, mirrored, redrawn = _row(z, ref), _row(-z, ref), _row(other, ref)  # three draws of N(0, I)
    far = _row(z + 0.5 * shift, ref)
    assert not significant(base, mirrored, paired=True) and not significant(base, redrawn)
    assert significant(base, far, paired=True) and significant(base, far)
    # the paired rule sees a shift that overlapping intervals hide: both sets move together with the noise
    near = _row(z + 0.12 * shift, ref)
    assert significant(base, near, paired=True) and not significant(base, near)


def test_significant_refuses_rows_it_cannot_compare(ref):
    row = _row(np.random.default_rng(6).normal(size=(50, D)), ref)
    with pytest.raises(ValueError, match="row 'bare' has no fid with a fid_ci95 interval"):
        significant(row, {"name": "bare", "fid": 1.0})
    with pytest.raises(ValueError, match="needs both rows' fid_boot replicates, of equal length"):
        significant(row, {**row, "fid_boot": row["fid_boot"][:10]}, paired=True)


def test_fingerprint_changes_with_the_reference_and_image_count_and_is_stable_otherwise(ref):
    from dstudio.distill.evaluation.features import WEIGHTS
    from dstudio.distill.evaluation.fingerprint import fingerprint, same_noise
    from dstudio.distill.evaluation.protocol import protocol_description
    from dstudio.distill.evaluation.spaces import feature_space

    mnist, pixels = feature_space("mnist", "cpu"), feature_space("pixels", "cpu")
    proto = protocol_description()
    fp = fingerprint(mnist, ref, 2000, **proto)
    copy = Stats(ref.mu.copy(), ref.sigma.copy(), None, ref.n, ref.features, ref.source)
    assert fingerprint(mnist, copy, 2000, **proto) == fp  # the statistics' values, not the object or its features
    assert fp["weights_sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert fp["reference_sha256"] == hashlib.sha256(ref.mu.astype(np.float64).tobytes()
                                                    + ref.sigma.astype(np.float64).tobytes()).hexdigest()
    assert fp["noise_seed"] == 0 and fp["n_generated"] == 2000 and "28x28" in fp["resize"]
    moved = Stats(ref.mu + 1e-6, ref.sigma, None, ref.n, ref.features, ref.source)
    for changed in (fingerprint(mnist, moved, 2000, **proto), fingerprint(mnist, ref, 1000, **proto),
                    fingerprint(pixels, ref, 2000, **proto), fingerprint(mnist, ref, 2000)):
        assert changed["id"] != fp["id"]
    assert fingerprint(pixels, ref, 2000)["weights_sha256"] is None
    assert same_noise(fp, dict(fp)) and not same_noise(fingerprint(mnist, ref, 2000), fingerprint(mnist, ref, 2000))


def test_results_tables_show_each_figure_with_its_interval():
    from dstudio.app.benchmark import rows_table

    rows = [{"name": "a", "fid": 0.08123, "fid_ci95": [0.07512, 0.08934]}, {"name": "old", "fid": 0.09}]
    table = rows_table(rows, [("name", "row"), ("fid", "FID-mnist")])
    assert "| a | 0.08123 [0.0751, 0.0893] |" in table and "| old | 0.09 |" in table


def _board(name, fid, ci, boot, protocol, source="s"):
    return {"source": source, "row": name, "fingerprint": protocol,
            "figure": {"name": name, "fid": fid, "fid_ci95": ci, "fid_boot": boot}}


def test_board_marks_rows_of_one_protocol_that_do_not_differ(ref):
    from dstudio.app.studio.board import mark_not_significant

    z = np.random.default_rng(10).normal(size=(1000, D))  # "same": these images in another order, an equal FID
    rows = {"base": _row(z, ref), "same": _row(z[::-1], ref), "far": _row(z + 0.5 * np.eye(D)[0], ref)}
    proto = {"id": "p1", "noise_seed": 0}
    board = [_board(n, r["fid"], r["fid_ci95"], r["fid_boot"], proto) for n, r in rows.items()]
    board.append(_board("elsewhere", rows["base"]["fid"], rows["base"]["fid_ci95"], None, {"id": "p2"}, "t"))
    board.append(_board("old", rows["base"]["fid"], None, None, proto))
    marks = {r["row"]: r["not_significant_vs"] for r in mark_not_significant(board)}
    assert marks == {"base": "same", "same": "base", "far": "-", "elsewhere": "-", "old": None}
