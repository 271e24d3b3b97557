"""evaluate(): ACC on the clean test set; ASR and RA on triggered test images whose label the
backdoor changes (non-target images for all-to-one)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .data.core import ImageData
from .engine import predict
from .metrics import accuracy, attack_success_rate, robust_accuracy
from .runtime import Runtime


def poisoned_test_set(test: ImageData, attack) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(triggered images, backdoor labels, true labels) for the eligible test images."""
    if hasattr(attack, "test_set"):  # attacks whose test set is not "trigger every eligible image" (CBA)
        return attack.test_set(test)
    keep = attack.eligible(test.y)
    x, yt = attack.apply(test.x[keep], test.y[keep])
    return x, yt, test.y[keep]


def evaluate(model: nn.Module, test: ImageData, attack=None, runtime: Runtime | None = None,
             poisoned: tuple | None = None) -> dict:
    """{'acc': ..., 'asr': ..., 'ra': ...} in percent. ``poisoned`` may carry a precomputed
    ``poisoned_test_set`` so repeated evaluations do not re-apply the trigger."""
    runtime = runtime or Runtime(device="cpu", progress=False)
    out = {"acc": 100 * accuracy(predict(model, test.x, runtime), test.y)}
    if attack is not None or poisoned is not None:
        xp, yt, ytrue = poisoned if poisoned is not None else poisoned_test_set(test, attack)
        pred = predict(model, xp, runtime)
        out["asr"] = 100 * attack_success_rate(pred, yt)
        out["ra"] = 100 * robust_accuracy(pred, ytrue)
    return out
