"""FST: Feature Shift Tuning (Min et al., NeurIPS 2023); official
AISafety-HKUST/stable_backdoor_purification ``fine_tune/fst.py``.

1. Re-initialise the classifier head (the last nn.Linear): U(-1/sqrt(d), 1/sqrt(d)) for the weight
   and the bias.
2. Fine-tune *all* weights on CE + alpha * <W_head, W_head_original>, pushing the head away from the
   backdoored one; after every step the head weight is rescaled to the original Frobenius norm.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..models import last_linear
from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import fine_tune, prepare


@dataclass
class FSTConfig:
    alpha: float = 0.1  # official README (the argparse default is 0.2)
    epochs: float = 10  # official (epochs over the clean set; step rule, common.py)
    batch_size: int = 128  # official
    lr: float = 0.01  # official
    momentum: float = 0.9  # official
    weight_decay: float = 5e-4  # official
    steps: int | None = None  # set the step count directly instead of the step rule
    augment: str | None = None  # None: the clean set's standard augmentation


@DEFENSES.register("fst")
def defend_fst(model, clean, cfg: FSTConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, FSTConfig) else config_with(FSTConfig, cfg or {})
    model, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    head = last_linear(model)
    w_orig = head.weight.detach().clone()
    norm = float(w_orig.norm())
    bound = 1.0 / math.sqrt(head.in_features)
    g = runtime.generator(1001, device=runtime.device)
    with torch.no_grad():
        head.weight.copy_((torch.rand(head.weight.shape, generator=g, device=g.device) * 2 - 1) * bound)
        if head.bias is not None:
            head.bias.copy_((torch.rand(head.bias.shape, generator=g, device=g.device) * 2 - 1) * bound)

    def loss(m, x, y, step):
        return F.cross_entropy(m(x), y) + cfg.alpha * (head.weight * w_orig).sum()

    def rescale(step, info):
        with torch.no_grad():
            head.weight.mul_(norm / (float(head.weight.norm()) + 1e-12))

    history = fine_tune(model, clean, runtime, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, steps=cfg.steps, augment=cfg.augment,
                        loss=loss, after_step=rescale, monitor=monitor, desc="fst")
    model.eval()
    return DefenseResult(model, history, {"seconds": time.perf_counter() - t0, "config": asdict(cfg)})
