"""One-shot recovery check: does the purified model read the clean images as well as the original does?

With ten clean images NFT's searches can leave a model that fits those ten and has lost a large part of its
clean accuracy (benchmarks/NOTES.md §21-22: LIRA s2 at 1/class, 98.3 -> 85.5), and recovery is then too short.
The defender has no held-out images, but the original model is a trustworthy labeller of clean inputs (a
backdoor fires on its trigger, not on digits), and random affine copies of the ten images are inputs NFT
never trained on (it trains on shifts and MixUp); they are stronger than ``augment.affine``'s defaults (20
degrees, scale 0.8-1.15, shear 0.18, shifts up to 12 % of the side), which the mnist10k models read at ~100 %. ``clean_gap`` is the original's accuracy on such copies
minus the purified model's: near 0 for a model that kept its clean accuracy, several points for one that lost it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import augment as A
from .data.core import CleanSet, to_float
from .engine import predict
from .runtime import Runtime


AFFINE = {"degrees": 20.0, "scale": (0.8, 1.15), "shear": 0.18, "translate": 0.24}  # translate: of the half side


def clean_gap(original: nn.Module, model: nn.Module, clean: CleanSet, n: int, runtime: Runtime) -> dict:
    """Accuracy (percent, labels = the clean images' own) of ``original`` and ``model`` on ``n`` random affine
    copies of the clean images (``augment.affine``, a generator of its own), and the gap between them."""
    g = runtime.generator(810)
    idx = torch.arange(n) % len(clean)
    x = A.affine(to_float(clean.x[idx]), g, **AFFINE)
    y = clean.y[idx]
    acc = [100 * (predict(m, x, runtime) == y).float().mean().item() for m in (original, model)]
    return {"original": round(acc[0], 2), "purified": round(acc[1], 2), "gap": round(acc[0] - acc[1], 2)}
