"""ACC, ASR, RA and DER (BackdoorBench's definitions; ASR on non-target images only)."""
from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean()) if len(y) else float("nan")


def attack_success_rate(pred_poison: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of triggered images predicted as their backdoor label.

    The caller passes only images whose true label differs from the backdoor label
    (non-target images for all-to-one), so the floor is 0, not 1/C.
    """
    return accuracy(pred_poison, target)


def robust_accuracy(pred_poison: torch.Tensor, y_true: torch.Tensor) -> float:
    """Fraction of triggered images still classified as their true label."""
    return accuracy(pred_poison, y_true)


def der(acc_bd: float, asr_bd: float, acc_def: float, asr_def: float) -> float:
    """Defense effectiveness rating in [0, 1]; 0.5 means no change (BackdoorBench's simplified form)."""
    return (max(0.0, asr_bd - asr_def) - max(0.0, acc_bd - acc_def) + 1) / 2
