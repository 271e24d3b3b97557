"""Dataset loaders on tiny fake files in each distributed format, written here (no downloads)."""
import os
import pickle

import numpy as np
import pytest
import torch

from nft.data import load_dataset
from nft.errors import NFTError


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar(root, num_classes, per_file=20):
    rng = np.random.default_rng(0)
    if num_classes == 10:
        base = root / "cifar-10-batches-py"
        files, tests, meta = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], ("batches.meta", "label_names")
        key = b"labels"
    else:
        base = root / "cifar-100-python"
        files, tests, meta = ["train"], ["test"], ("meta", "fine_label_names")
        key = b"fine_labels"
        per_file = 4 * num_classes
    base.mkdir(parents=True)
    for name in files + tests:
        labels = [i % num_classes for i in range(per_file)]
        _pickle(base / name, {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8), key: labels,
                              b"batch_label": b"fake"})
    _pickle(base / meta[0], {meta[1].encode(): [f"c{i}" for i in range(num_classes)]})


@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_python_batches(tmp_path, name, k):
    _fake_cifar(tmp_path, k)
    d = load_dataset(name, root=str(tmp_path))
    assert d.num_classes == k and d.input_shape == (3, 32, 32)
    assert d.train.x.dtype == torch.uint8 and len(d.train) + len(d.heldout) == (100 if k == 10 else 4 * k)
    assert len(d.test) == (20 if k == 10 else 4 * k)
    assert d.classes[:2] == ["c0", "c1"] and d.name == name
    # the pixels come through in CHW order: row 0 of channel 0 is the first 32 bytes
    raw = pickle.load(open(tmp_path / ("cifar-10-batches-py/test_batch" if k == 10 else "cifar-100-python/test"), "rb"),
                      encoding="bytes")[b"data"]
    assert torch.equal(d.test.x[0, 0, 0], torch.from_numpy(raw[0, :32]))
    assert torch.equal(d.test.x[0, 2, 31], torch.from_numpy(raw[0, -32:]))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    _fake_cifar(tmp_path, 10)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {b"data": Evil()})
    with pytest.raises(NFTError, match="refusing"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar_missing_is_one_line_error(tmp_path):
    with pytest.raises(NFTError, match="not found"):
        load_dataset("cifar10", root=str(tmp_path))


def test_svhn_mat(tmp_path):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 20)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # labels 1..10, 10 = digit 0
        sio.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    d = load_dataset("svhn", root=str(tmp_path))
    assert d.input_shape == (3, 32, 32) and len(d.test) == 20
    assert sorted(d.test.y.unique().tolist()) == list(range(10))
    x = sio.loadmat(tmp_path / "test_32x32.mat")["X"]
    assert torch.equal(d.test.x[3].permute(1, 2, 0), torch.from_numpy(x[..., 3]))
    assert int(d.test.y[9]) == 0  # the file's label 10


def test_mnist_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], ">i4").tobytes() + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, n], ">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes())
    d = load_dataset("mnist", root=str(tmp_path))
    assert d.input_shape == (1, 28, 28) and len(d.test) == 20 and d.augment == "shift"


def _png(path, rgb, size=(10, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def test_gtsrb_folders(tmp_path):
    from PIL import Image

    base = tmp_path / "gtsrb" / "GTSRB"
    for c in range(43):
        for i in range(2):
            p = base / "Training" / f"{c:05d}" / f"{i:05d}_00000.ppm"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (30, 33), (c * 5, 0, 0)).save(p)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    (base / "Final_Test" / "Images").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (40, 40), (i * 5, 0, 0)).save(base / "Final_Test" / "Images" / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;40;40;0;0;39;39;{i}")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    d = load_dataset("gtsrb", root=str(tmp_path))
    assert d.num_classes == 43 and d.input_shape == (3, 32, 32)
    assert len(d.train) + len(d.heldout) == 86 and d.test.y.tolist() == [0, 1, 2, 3, 4]
    assert int(d.test.x[2, 0].float().mean()) == 10  # red channel of class 2's test image


def test_imagenet_layout(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for c, rgb in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", rgb)
    d = load_dataset("imagenet", root=str(tmp_path), image_size=16)
    assert d.classes == ["n01", "n02"] and d.input_shape == (3, 16, 16) and d.name == "imagenet"
    assert d.test.y.tolist() == [0, 1]
    assert d.test.x[0, 0].min() == 255 and d.test.x[1, 2].min() == 255
    d2 = load_dataset("imagefolder", root=str(tmp_path), image_size=8)
    assert d2.name == "imagefolder" and d2.input_shape == (3, 8, 8)


def test_tiny_imagenet_layout(tmp_path):
    lines = []
    for c, rgb in (("n01", (200, 0, 0)), ("n02", (0, 200, 0)), ("n03", (0, 0, 200))):
        for i in range(3):
            _png(tmp_path / "train" / c / "images" / f"{c}_{i}.JPEG", rgb)
        (tmp_path / "train" / c / f"{c}_boxes.txt").write_text("")
        _png(tmp_path / "val" / "images" / f"val_{c}.JPEG", rgb)
        lines.append(f"val_{c}.JPEG\t{c}\t0\t0\t9\t7")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    d = load_dataset("tinyimagenet", root=str(tmp_path))
    assert d.input_shape == (3, 64, 64) and d.num_classes == 3 and d.name == "tinyimagenet"
    assert d.test.y.tolist() == [0, 1, 2]
    assert int(d.test.x[1, 1].float().mean()) == 200


def test_image_folder_errors(tmp_path):
    with pytest.raises(NFTError, match="train/"):
        load_dataset("imagefolder", root=str(tmp_path))
    _png(tmp_path / "train" / "a" / "0.png", (0, 0, 0))
    with pytest.raises(NFTError, match="val/"):
        load_dataset("imagefolder", root=str(tmp_path))
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(NFTError, match="cannot read image"):
        load_dataset("imagefolder", root=str(tmp_path))
