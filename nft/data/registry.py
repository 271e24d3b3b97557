"""Dataset registry: the embedded mnist10k, torchvision datasets, and image folders.

Every builder returns DatasetSplits with uint8 (N, C, H, W) images and a defender pool
(``heldout``) that is held out from the training data, stratified, with a fixed seed.
"""
from __future__ import annotations

import os
from importlib import resources

import numpy as np
import torch

from ..errors import NFTError
from ..registry import DATASETS
from .core import DatasetSplits, ImageData, holdout_split
from .files import read_cifar, read_svhn

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_dataset(name: str, root: str | None = None, download: bool = False, holdout: float = 0.1,
                 split_seed: int = 0, **kwargs) -> DatasetSplits:
    """Build a registered dataset. ``holdout`` of every training class becomes the defender's pool."""
    return DATASETS.get(name)(root=root, download=download, holdout=holdout, split_seed=split_seed, **kwargs)


def _nchw(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))


def make_splits(name, x_train, y_train, x_test, y_test, num_classes, mean, std, augment, holdout, split_seed,
                classes=None) -> DatasetSplits:
    x_train, x_test = _nchw(x_train), _nchw(x_test)
    y_train = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    y_test = torch.as_tensor(np.asarray(y_test), dtype=torch.long)
    train_idx, held_idx = holdout_split(y_train, num_classes, holdout, split_seed)
    return DatasetSplits(
        name=name,
        train=ImageData(x_train[train_idx], y_train[train_idx]),
        heldout=ImageData(x_train[held_idx], y_train[held_idx]),
        test=ImageData(x_test, y_test),
        num_classes=num_classes,
        mean=mean,
        std=std,
        augment=augment,
        classes=list(classes) if classes is not None else [str(c) for c in range(num_classes)],
    )


@DATASETS.register("mnist10k")
def mnist10k(root=None, download=False, holdout=0.1, split_seed=0, **_):
    """10,000 real MNIST digits shipped inside the package (CC BY-SA 3.0, LeCun, Cortes and Burges)."""
    source = root or resources.files("nft.data").joinpath("mnist10k.npz")
    with open(source, "rb") if isinstance(source, str) else source.open("rb") as f:
        d = np.load(f, allow_pickle=False)
        arrays = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return make_splits("mnist10k", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], 10,
                       MNIST_MEAN, MNIST_STD, "shift", holdout, split_seed)


def _root(root: str | None) -> str:
    return root or os.environ.get("NFT_DATA", os.path.expanduser("~/.cache/nft/data"))


def _tv(cls_name, root, download, **kw):
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(_root(root), download=download, **kw)
    except RuntimeError as e:  # torchvision says "Dataset not found or corrupted"
        raise NFTError(f"{cls_name} not found under {_root(root)} ({e}); pass --download or --data-root") from None


def _torchvision_pair(cls_name, root, download, train_kw, test_kw, label_attr="targets"):
    tr, te = _tv(cls_name, root, download, **train_kw), _tv(cls_name, root, download, **test_kw)
    return tr.data, getattr(tr, label_attr), te.data, getattr(te, label_attr), getattr(tr, "classes", None)


@DATASETS.register("mnist")
def mnist(root=None, download=False, holdout=0.1, split_seed=0, **_):
    xt, yt, xv, yv, classes = _torchvision_pair("MNIST", root, download, {"train": True}, {"train": False})
    return make_splits("mnist", xt.numpy(), yt, xv.numpy(), yv, 10, MNIST_MEAN, MNIST_STD, "shift", holdout,
                       split_seed, classes)


def _fetch(cls_name, root, download, **kw):
    """With --download, let torchvision fetch (and md5-check) the files; reading is ours either way."""
    if download:
        _tv(cls_name, root, True, **kw)


@DATASETS.register("cifar10")
def cifar10(root=None, download=False, holdout=0.1, split_seed=0, **_):
    """``root/cifar-10-batches-py/`` (the python version), read without unpickling code."""
    _fetch("CIFAR10", root, download)
    xt, yt, xv, yv, classes = read_cifar(_root(root), 10)
    return make_splits("cifar10", xt, yt, xv, yv, 10, CIFAR_MEAN, CIFAR_STD, "crop_flip", holdout, split_seed, classes)


@DATASETS.register("cifar100")
def cifar100(root=None, download=False, holdout=0.1, split_seed=0, **_):
    """``root/cifar-100-python/`` (fine labels), read without unpickling code."""
    _fetch("CIFAR100", root, download)
    xt, yt, xv, yv, classes = read_cifar(_root(root), 100)
    return make_splits("cifar100", xt, yt, xv, yv, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                       "crop_flip", holdout, split_seed, classes)


@DATASETS.register("svhn")
def svhn(root=None, download=False, holdout=0.1, split_seed=0, **_):
    """``root/{train,test}_32x32.mat`` (needs scipy); the extra split is not used."""
    if download:
        _fetch("SVHN", root, True, split="train")
        _fetch("SVHN", root, True, split="test")
    xt, yt = read_svhn(_root(root), "train")
    xv, yv = read_svhn(_root(root), "test")
    return make_splits("svhn", xt, yt, xv, yv, 10, (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), "crop",
                       holdout, split_seed)


def _load_images(paths, size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except (OSError, ValueError) as e:
            raise NFTError(f"cannot read image {p} ({e})") from None
    return out


@DATASETS.register("gtsrb")
def gtsrb(root=None, download=False, holdout=0.1, split_seed=0, image_size=32, **_):
    tr = _tv("GTSRB", root, download, split="train")
    te = _tv("GTSRB", root, download, split="test")
    xt = _load_images([p for p, _ in tr._samples], image_size)
    xv = _load_images([p for p, _ in te._samples], image_size)
    return make_splits("gtsrb", xt, [t for _, t in tr._samples], xv, [t for _, t in te._samples], 43,
                       (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), "crop", holdout, split_seed)


def _folder(path: str, class_to_idx: dict | None = None):
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".JPEG")
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir())
    if not classes:
        raise NFTError(f"no class folders under {path}")
    class_to_idx = class_to_idx or {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in classes:
        if c not in class_to_idx:
            raise NFTError(f"class folder {c!r} in {path} is not among the training classes")
        for dirpath, _, files in sorted(os.walk(os.path.join(path, c))):
            for f in sorted(files):
                if f.endswith(exts):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(class_to_idx[c])
    return paths, labels, class_to_idx


def _tiny_imagenet_val(path: str, class_to_idx: dict):
    """Tiny-ImageNet's val/ holds images/ and val_annotations.txt instead of class folders."""
    paths, labels = [], []
    with open(os.path.join(path, "val_annotations.txt")) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in class_to_idx:
                paths.append(os.path.join(path, "images", parts[0]))
                labels.append(class_to_idx[parts[1]])
    return paths, labels


def _image_folder(name, root, holdout, split_seed, image_size):
    if root is None or not os.path.isdir(os.path.join(root, "train")):
        raise NFTError(f"{name} needs --data-root with a train/ folder (got {root!r})")
    tr_paths, tr_labels, c2i = _folder(os.path.join(root, "train"))
    val = next((os.path.join(root, v) for v in ("val", "test") if os.path.isdir(os.path.join(root, v))), None)
    if val is None:
        raise NFTError(f"no val/ or test/ folder under {root}")
    if os.path.exists(os.path.join(val, "val_annotations.txt")):
        va_paths, va_labels = _tiny_imagenet_val(val, c2i)
    else:
        va_paths, va_labels, _ = _folder(val, c2i)
    for split, paths in (("train", tr_paths), (os.path.basename(val), va_paths)):
        if not paths:
            raise NFTError(f"no images in {os.path.join(root, split)}")
    xt, xv = _load_images(tr_paths, image_size), _load_images(va_paths, image_size)
    classes = sorted(c2i, key=c2i.get)
    return make_splits(name, xt, tr_labels, xv, va_labels, len(classes), IMAGENET_MEAN, IMAGENET_STD, "crop_flip",
                       holdout, split_seed, classes)


@DATASETS.register("imagefolder")
def imagefolder(root=None, download=False, holdout=0.1, split_seed=0, image_size=64, **_):
    """``root/train/<class>/**/*.jpg`` and ``root/val/<class>/**/*.jpg`` (ImageNet layout), or
    Tiny-ImageNet's ``val/images`` + ``val/val_annotations.txt``. Images are resized to
    ``image_size`` and held in memory as uint8 (so ImageNet itself only as a subset)."""
    return _image_folder("imagefolder", root, holdout, split_seed, image_size)


@DATASETS.register("tinyimagenet")
def tinyimagenet(root=None, download=False, holdout=0.1, split_seed=0, image_size=64, **_):
    """Tiny-ImageNet-200 as unpacked (``train/<wnid>/images/*.JPEG``, ``val/images``,
    ``val/val_annotations.txt``), 64 x 64."""
    return _image_folder("tinyimagenet", root, holdout, split_seed, image_size)


@DATASETS.register("imagenet")
def imagenet(root=None, download=False, holdout=0.1, split_seed=0, image_size=224, **_):
    """ImageNet (or a subset of its classes) in the ``train/<wnid>/`` + ``val/<wnid>/`` layout, 224 x 224,
    held in memory as uint8: about 150 KB per image."""
    return _image_folder("imagenet", root, holdout, split_seed, image_size)
