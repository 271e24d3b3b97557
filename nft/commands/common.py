"""Arguments, validation and helpers shared by the subcommands.

Inputs are checked here, before any long work starts, and every problem is an NFTError (one line,
exit 2): numbers out of range, a model file with no manifest and no --arch, clean images of the
wrong shape, labels outside the model's classes, an output directory that would swallow the input.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

from ..errors import NFTError
from ..runtime import Runtime


# -- argparse value types: a bad value becomes a one-line usage error ---------------------------------
def _number(kind, low=None, high=None, low_open=False):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


positive_int = _number(int, 1)
nonneg_int = _number(int, 0)
positive_float = _number(float, 0, low_open=True)
unit_float = _number(float, 0, 1)
seed_int = _number(int, 0, 2**31 - 1)


# -- runtime ------------------------------------------------------------------------------------------
def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--threads", type=_number(int, 1, 4096), default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def runtime_from(args) -> Runtime:
    try:
        rt = Runtime(device=args.device, precision=args.precision, seed=args.seed, threads=args.threads,
                     progress=not args.no_progress)
        torch.empty(0, device=rt.torch_device)
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        raise NFTError(f"device {args.device!r} is not usable: {(str(e).splitlines() or [''])[0]}") from None
    return rt


# -- models without a manifest --------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a model file without manifest.json (.pt, .pth, .safetensors)")
    g.add_argument("--arch", default=None, help="registered model (preactresnet18, smallcnn, ...) or torchvision:NAME")
    g.add_argument("--num-classes", type=_number(int, 2, 1_000_000), default=None)
    g.add_argument("--normalize", default=None,
                   help="input normalization the model was trained with: a dataset (cifar10, mnist, imagenet, ...), "
                        "'none' for raw [0, 1] pixels, or MEAN/STD such as 0.5,0.5,0.5/0.25,0.25,0.25")
    g.add_argument("--input-shape", default=None, help="C,H,W (default: the --normalize dataset's)")
    g.add_argument("--width", type=_number(int, 1, 4096), default=None, help="channel width of the architecture")
    g.add_argument("--arch-kwargs", default=None, help="other builder arguments as JSON, e.g. '{\"image_size\": 32}'")


def model_spec(args) -> dict:
    kwargs = {}
    if getattr(args, "arch_kwargs", None):
        try:
            kwargs = json.loads(args.arch_kwargs)
        except json.JSONDecodeError as e:
            raise NFTError(f"--arch-kwargs must be a JSON object ({e})") from None
        if not isinstance(kwargs, dict):
            raise NFTError("--arch-kwargs must be a JSON object such as '{\"width\": 16}'")
    if getattr(args, "width", None) is not None:
        kwargs["width"] = args.width
    return {"arch": args.arch, "num_classes": args.num_classes, "normalize": args.normalize,
            "input_shape": args.input_shape, "arch_kwargs": kwargs or None}


def load_model_arg(args, device):
    from ..io import load_model

    return load_model(args.model, device, **model_spec(args))


# -- the defender's clean data ------------------------------------------------------------------------
def add_clean_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("defender's clean data")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--per-class", type=positive_int, default=None, help="clean images per class (default 50)")
    m.add_argument("--fraction", type=_number(float, 0, 1, low_open=True), default=None,
                   help="fraction of the clean pool per class")
    g.add_argument("--clean-npz", default=None,
                   help="your own clean images: an .npz with x (N,H,W[,C] or N,C,H,W; uint8, or float in [0, 1]) "
                        "and y (integer labels); default: the held-out pool of the model's dataset")
    g.add_argument("--data-root", default=None, help="where torchvision datasets live")
    g.add_argument("--clean-seed", type=seed_int, default=0, help="seed of the stratified pick")


def load_clean_npz(path: str, num_classes: int | None = None, input_shape=None):
    """Images and labels from an .npz (never unpickled), checked against the model when given."""
    if not os.path.isfile(path):
        raise NFTError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d or "y" not in d:
                raise NFTError(f"{path} must hold arrays named x and y (it has {sorted(d.keys())[:6]})")
            x, y = d["x"], d["y"]
    except NFTError:
        raise
    except ValueError as e:  # object arrays would need pickle: refused
        raise NFTError(f"{path}: refusing arrays that need unpickling, or a corrupt .npz ({str(e)[:120]})") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ...: truncated or not an .npz
        raise NFTError(f"{path} is not a readable .npz file (corrupt or truncated? {type(e).__name__})") from None
    return images_from_arrays(x, y, path, num_classes, input_shape)


def images_from_arrays(x: np.ndarray, y: np.ndarray, what: str, num_classes=None, input_shape=None):
    from ..data.core import ImageData

    if x.ndim not in (3, 4):
        raise NFTError(f"images in {what} must be (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {x.shape}")
    if len(x) == 0:
        raise NFTError(f"{what} holds no images")
    if y.ndim != 1 or len(y) != len(x):
        raise NFTError(f"{what}: y must be one label per image, got shape {y.shape} for {len(x)} images")
    if not (np.issubdtype(y.dtype, np.integer) or (y.dtype.kind == "f" and np.all(np.isfinite(y)) and
                                                    np.all(y == np.round(y)))):
        raise NFTError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if x.dtype == np.uint8:
        xt = _to_nchw(x, input_shape)
    elif x.dtype.kind in "fiu":
        xf = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(xf)) or xf.min() < 0 or xf.max() > 1:
            raise NFTError(f"{what}: non-uint8 images must be finite floats in [0, 1]")
        xt = _to_nchw(xf, input_shape)
    else:
        raise NFTError(f"{what}: images must be uint8 or float, got dtype {x.dtype}")
    yt = torch.as_tensor(y.astype(np.int64))
    if num_classes is not None and (int(yt.min()) < 0 or int(yt.max()) >= num_classes):
        raise NFTError(f"{what}: labels must be in 0..{num_classes - 1} for this model, "
                       f"found {int(yt.min())}..{int(yt.max())}")
    return ImageData(xt, yt)


def _to_nchw(x: np.ndarray, input_shape=None) -> torch.Tensor:
    """(N,H,W) -> (N,1,H,W); channels-last -> channels-first when the channel axis is unambiguous,
    or when only one reading matches the model's input shape."""
    if x.ndim == 3:
        x = x[:, None]
    want = tuple(input_shape) if input_shape is not None else None
    if want is not None and tuple(x.shape[1:]) != want and (x.shape[3], x.shape[1], x.shape[2]) == want:
        x = x.transpose(0, 3, 1, 2)
    elif want is None and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def check_shape(x_shape, manifest: dict, what: str) -> None:
    want = tuple(manifest["input_shape"])
    got = tuple(x_shape[1:])
    if got != want:
        which = "channel count" if got[0] != want[0] else "size"
        raise NFTError(f"{what} have shape {got} (C, H, W) but the model takes {want}: wrong {which}")


# -- outputs ------------------------------------------------------------------------------------------
def check_out(out: str, *inputs: str | None) -> None:
    """The output may not be an input, contain one, or sit inside one: --overwrite would destroy it."""
    o = os.path.realpath(out)
    for i in inputs:
        if not i:
            continue
        r = os.path.realpath(i)
        if o == r or r.startswith(o + os.sep) or o.startswith(r + os.sep):
            raise NFTError(f"--out {out} overlaps the input {i}; inputs are never modified, pick another directory")
