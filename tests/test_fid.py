"""FID through clean-fid: closed forms, identities, the feature net's contract, and bad folders."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dstudio.app.cli import main
from dstudio.distill.evaluation.features import CARD, FEATURE_DIM, load_feature_net
from dstudio.distill.evaluation.spaces import FIDError, feature_space, scan_folder, tensor_features
from dstudio.distill.evaluation.stats import Stats, frechet
from dstudio.distill.data import mnist5k


def test_frechet_distance_matches_the_gaussian_closed_form():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2, s = standard deviations."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.5])
    a = Stats(mu1, np.diag(s1**2), None, 10, "x", "a")
    b = Stats(mu2, np.diag(s2**2), None, 10, "x", "b")
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet(a, b) == pytest.approx(expected, rel=1e-6)
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]  # FID is invariant to rotations
    ar = Stats(rot @ mu1, rot @ np.diag(s1**2) @ rot.T, None, 10, "x", "a")
    br = Stats(rot @ mu2, rot @ np.diag(s2**2) @ rot.T, None, 10, "x", "b")
    assert frechet(ar, br) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_noise_is_worse():
    from dstudio.distill.data import digits8

    space = feature_space("mnist", "cpu")
    x = digits8(8).images[:400]
    a = Stats.of(tensor_features(x, space), "mnist", "a")
    assert abs(frechet(a, a)) < 1e-6
    noisy = Stats.of(tensor_features((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), space), "mnist", "n")
    assert frechet(a, noisy) > 0.1


def test_feature_net_input_contract():
    """clean-fid hands [0, 255] floats of (B, 3, 299, 299); native 28x28 gives the same features."""
    net = load_feature_net()
    x28 = (mnist5k(28).images[:16] + 1) * 127.5
    big = torch.nn.functional.interpolate(x28, size=(299, 299), mode="bilinear").expand(-1, 3, -1, -1)
    f28, f299 = net(x28.expand(-1, 3, -1, -1)), net(big)
    assert f28.shape == (16, FEATURE_DIM) and f299.shape == (16, FEATURE_DIM)
    cos = torch.nn.functional.cosine_similarity(f28, f299).min()
    assert cos > 0.9
    assert (net.logits(x28.expand(-1, 3, -1, -1)).argmax(1) == mnist5k(28).labels[:16]).float().mean() >= 0.9


def test_shipped_feature_net_meets_the_accuracy_bar_on_its_heldout_split():
    """Recomputed from the shipped weights on the split the card names, not read back from the card."""
    card = json.loads(CARD.read_text())
    _, test = mnist5k(28).split(0.2, seed=1234)
    assert card["split"] == "MNIST-5k, holdout 0.2, split seed 1234" and len(test) == card["n_heldout"] == 1000
    with torch.no_grad():
        accuracy = (load_feature_net().logits((test.images + 1) * 127.5).argmax(1) == test.labels).float().mean()
    assert accuracy >= 0.97 and accuracy == pytest.approx(card["heldout_accuracy"], abs=2e-3)


def _write(folder, n, size=(8, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, size, dtype=np.uint8)).save(folder / f"{i}.png")


def test_bad_folders(tmp_path):
    with pytest.raises(FIDError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FIDError, match="holds no images"):
        scan_folder(tmp_path / "empty")
    _write(tmp_path / "mixed", 2)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "mixed" / "big.png")
    with pytest.raises(FIDError, match="mixed sizes"):
        scan_folder(tmp_path / "mixed")
    _write(tmp_path / "ok", 3)
    (tmp_path / "ok" / "broken.png").write_bytes(b"\x89PNG not really")
    good, bad = scan_folder(tmp_path / "ok")
    assert len(good) == 3 and [p.endswith("broken.png") for p in bad] == [True]


def test_fid_cli_names_skipped_files_and_writes_json(tmp_path, capsys):
    _write(tmp_path / "gen", 12)
    (tmp_path / "gen" / "broken.png").write_bytes(b"junk")
    _write(tmp_path / "ref", 12)
    out = tmp_path / "r.json"
    assert main(["fid", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "ref"), "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped corrupt image" in err and "broken.png" in err and "FID is strongly biased" in err
    r = json.loads(out.read_text())
    assert r["features"] == "mnist" and r["n_generated"] == 12 and r["n_reference"] == 12
    assert len(r["skipped_corrupt"]) == 1 and "versions" in r and "date" in r
    stats = tmp_path / "ref.npz"
    assert main(["fid", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "ref"), "--save-ref-stats",
                 str(stats)]) == 0
    again = tmp_path / "again.json"
    assert main(["fid", "--images", str(tmp_path / "gen"), "--ref", str(stats), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["fid"] == pytest.approx(r["fid"], rel=1e-9)
    assert main(["fid", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "nope.npz")]) == 2
    assert "statistics file" in capsys.readouterr().err

