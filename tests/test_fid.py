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


def _gaussian_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) of two feature sets, derived here: for symmetric PSD matrices
    Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2, the sum of the square roots of a symmetric matrix's eigenvalues."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(0)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def _on_uint8_grid(generator, shape, high=256):
    """Images in [-1, 1] whose pixels are exact uint8 levels k / 127.5 - 1 (clean-fid's quantisation keeps k)."""
    k = torch.randint(0, high, shape, generator=generator)
    return k, k / 127.5 - 1


def test_pixels_space_is_the_frechet_distance_of_grayscale_pixel_statistics():
    """RGB 8x8 images: features are the channel means of the uint8 levels / 255, flattened (64-d, no resize)."""
    g = torch.Generator().manual_seed(0)
    (ka, a), (kb, b) = _on_uint8_grid(g, (300, 3, 8, 8)), _on_uint8_grid(g, (300, 3, 8, 8), high=200)
    space = feature_space("pixels", "cpu")
    fa, fb = tensor_features(a, space), tensor_features(b, space)
    expected_a = (ka.double().mean(1) / 255).flatten(1).numpy()
    np.testing.assert_allclose(fa, expected_a, atol=1e-6)
    fid = frechet(Stats.of(fa, "pixels", "a"), Stats.of(fb, "pixels", "b"))
    assert fid == pytest.approx(_gaussian_frechet(expected_a, (kb.double().mean(1) / 255).flatten(1).numpy()),
                                rel=1e-5)


def test_pixels_space_area_resizes_large_images_to_32px():
    """64x64 images become the means of their 2x2 blocks; 32x32 and smaller ones keep their size."""
    g = torch.Generator().manual_seed(1)
    k, x = _on_uint8_grid(g, (4, 1, 64, 64))
    feats = tensor_features(x, feature_space("pixels", "cpu"))
    blocks = (k.double() / 255).reshape(4, 32, 2, 32, 2).mean((2, 4)).flatten(1).numpy()
    assert feats.shape == (4, 1024)
    np.testing.assert_allclose(feats, blocks, atol=1e-6)
    assert tensor_features(x[..., :20, :20], feature_space("pixels", "cpu")).shape == (4, 400)


def test_salt_noise_raises_pixels_fd_far_more_than_mnist_fid():
    """Salt noise (1% of pixels set white) on 1,000 real 16 px digits: the digit classifier still reads the digits,
    the pixel statistics do not. Each space's rise is measured against its own real-vs-real value."""
    from dstudio.distill.evaluation.fid import fid_of_tensor
    from dstudio.distill.evaluation.protocol import protocol_reference

    x = mnist5k(16, seed=1).images[:1000]
    salt = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.01
    salted = torch.where(salt, torch.ones_like(x), x)
    rise = {}
    for name in ("mnist", "pixels"):
        space, ref = protocol_reference(name, 16)
        clean, noisy = (fid_of_tensor(images, ref, space, name)["fid"] for images in (x, salted))
        rise[name] = noisy / clean - 1
    assert rise["pixels"] > 5 and rise["pixels"] > 3 * rise["mnist"], rise


def test_fid_cli_takes_the_pixels_space(tmp_path, capsys):
    _write(tmp_path / "gen", 6)
    assert main(["fid", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "gen"), "--features", "pixels",
                 "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["features"] == "pixels" and abs(r["fid"]) < 1e-6 and "feature_net_heldout_accuracy" not in r
    fp = r["fingerprint"]["pixels"]
    assert r["fid_ci95"][0] <= r["fid"] <= r["fid_ci95"][1] and fp["n_generated"] == 6 and fp["noise_seed"] is None
    assert "FID-pixels " in capsys.readouterr().out
