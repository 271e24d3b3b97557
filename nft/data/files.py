"""Readers for dataset files in their distributed formats, without unpickling code.

- CIFAR-10/100 "python version" batches are pickles. ``safe_unpickle`` admits only the few globals a
  pickled dict of numpy arrays needs (numpy's array reconstructor, ndarray, dtype); anything else
  in the file raises, so a hostile pickle cannot run code. Files are not checked against
  torchvision's md5 sums, so subsets and re-packed copies load too.
- SVHN ``{train,test}_32x32.mat`` (MATLAB v5) through ``scipy.io.loadmat`` (scipy is an optional
  dependency: ``pip install nft[svhn]``).
"""
from __future__ import annotations

import importlib
import io
import os
import pickle

import numpy as np

from ..errors import NFTError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        if module.startswith("numpy.core"):
            try:
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except ImportError:  # numpy < 2
                pass
        return getattr(importlib.import_module(module), name)


def safe_unpickle(path: str) -> dict:
    """A pickled dict (CIFAR batch) with str keys; only numpy arrays, lists, strings and numbers."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except FileNotFoundError:
        raise NFTError(f"missing dataset file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise NFTError(f"{path} is not a readable dataset pickle ({e})") from None
    if not isinstance(obj, dict):
        raise NFTError(f"{path} does not hold a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
         "labels", "label_names"),
    100: ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def read_cifar(root: str, num_classes: int):
    """(x_train, y_train, x_test, y_test, classes) with images (N, 3, 32, 32) uint8."""
    folder, train_files, test_files, meta_file, label_key, names_key = CIFAR[num_classes]
    base = os.path.join(root, folder)
    if not os.path.isdir(base):
        raise NFTError(f"CIFAR-{num_classes} not found: no folder {base} (pass --download or --data-root)")

    def load(files):
        xs, ys = [], []
        for name in files:
            d = safe_unpickle(os.path.join(base, name))
            if "data" not in d or label_key not in d:
                raise NFTError(f"{os.path.join(base, name)} lacks 'data' or '{label_key}'")
            x = np.asarray(d["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise NFTError(f"{os.path.join(base, name)}: 'data' should be (N, 3072) uint8, got {x.shape}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = load(train_files)
    x_test, y_test = load(test_files)
    meta_path = os.path.join(base, meta_file)
    classes = safe_unpickle(meta_path).get(names_key) if os.path.isfile(meta_path) else None
    return x_train, y_train, x_test, y_test, classes


def read_svhn(root: str, split: str):
    """Images (N, 3, 32, 32) uint8 and labels 0-9 (the file stores digit 0 as label 10)."""
    path = os.path.join(root, f"{split}_32x32.mat")
    if not os.path.isfile(path):
        raise NFTError(f"SVHN not found: no file {path} (pass --download or --data-root)")
    try:
        import scipy.io
    except ImportError:
        raise NFTError("reading SVHN's .mat files needs scipy: pip install 'nft[svhn]' (or scipy)") from None
    try:
        d = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt files
        raise NFTError(f"{path} is not a readable .mat file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if "X" not in d or "y" not in d or d["X"].ndim != 4:
        raise NFTError(f"{path} should hold X (32, 32, 3, N) and y (N, 1)")
    x = np.ascontiguousarray(np.asarray(d["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
    y = np.asarray(d["y"], dtype=np.int64).reshape(-1) % 10
    return x, y
