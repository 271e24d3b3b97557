"""Arguments and helpers shared by the subcommands."""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from ..errors import NFTError
from ..runtime import Runtime


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def runtime_from(args) -> Runtime:
    try:
        rt = Runtime(device=args.device, precision=args.precision, seed=args.seed, threads=args.threads,
                     progress=not args.no_progress)
        torch.empty(0, device=rt.torch_device)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise NFTError(f"device {args.device!r} is not usable: {str(e).splitlines()[0]}") from None
    return rt


def add_clean_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("defender's clean data")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--per-class", type=int, default=None, help="clean images per class (default 50)")
    m.add_argument("--fraction", type=float, default=None, help="fraction of the clean pool per class")
    g.add_argument("--clean-npz", default=None,
                   help="your own clean images: an .npz with x (N,H,W[,C] or N,C,H,W uint8) and y; "
                        "default: the held-out pool of the model's dataset")
    g.add_argument("--data-root", default=None, help="where torchvision datasets live")
    g.add_argument("--clean-seed", type=int, default=0, help="seed of the stratified pick")


def load_clean_npz(path: str):
    if not os.path.isfile(path):
        raise NFTError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as d:
            x, y = d["x"], d["y"]
    except (KeyError, ValueError, OSError) as e:
        raise NFTError(f"{path} must be an .npz with arrays x and y ({e})") from None
    from ..data.core import ImageData
    from ..data.registry import _nchw

    if x.ndim not in (3, 4):
        raise NFTError(f"clean images in {path} must have 3 or 4 dimensions, got shape {x.shape}")
    xt = _nchw(x) if x.dtype == np.uint8 else torch.from_numpy(np.asarray(x, dtype=np.float32))
    if xt.dtype != torch.uint8 and (xt.min() < 0 or xt.max() > 1):
        raise NFTError(f"float clean images in {path} must be in [0, 1]")
    return ImageData(xt, torch.as_tensor(y, dtype=torch.long))


def check_shape(x_shape, manifest: dict, what: str) -> None:
    want = tuple(manifest["input_shape"])
    if tuple(x_shape[1:]) != want:
        raise NFTError(f"{what} have shape {tuple(x_shape[1:])} but the model takes {want}")
