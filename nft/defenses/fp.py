"""FP: Fine-Pruning (Liu et al., RAID 2018), as in BackdoorBench ``defense/fp.py``.

1. Average, over the clean set, the activations that enter the classifier head (the last
   nn.Linear: the pooled features of a ResNet).
2. Prune those input channels in ascending order of mean activation, ``ceil(d * once_prune_ratio)``
   at a time (zeroing the head's weight columns), until clean accuracy has dropped by at least
   ``acc_ratio`` relative to the unpruned model; keep the last pruning under that limit.
3. Fine-tune as FT, with the pruned columns held at zero.

Threshold without test data: BackdoorBench measures the accuracy drop on the *test set*. Here the
clean set is split per class: ``val_fraction`` of every class is held out for the accuracy rule
and the rest ranks the channels; fine-tuning then uses the whole clean set. With fewer than
1 / val_fraction images per class (nothing to hold out), the whole set serves both roles.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.utils import parametrize

from ..data.core import stratified_pick
from ..masks import ChannelMask
from ..models import last_linear
from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import clean_accuracy, fine_tune, prepare


@dataclass
class FPConfig:
    once_prune_ratio: float = 0.01  # BB: channels pruned per step = ceil(d * 0.01)
    acc_ratio: float = 0.1  # BB: stop at a relative clean-ACC drop >= 10%
    val_fraction: float = 0.2  # ours: share of each class held out for the ACC rule (BB used the test set)
    epochs: float = 100  # BB: fine-tune as FT afterwards (epochs over the clean set; step rule, common.py)
    batch_size: int = 256  # BB shared setting
    lr: float = 0.01  # BB
    momentum: float = 0.9  # BB
    weight_decay: float = 5e-4  # BB
    steps: int | None = None  # fine-tuning steps, instead of the step rule
    augment: str | None = None  # None: the clean set's standard augmentation


def split_clean(clean, fraction: float, seed: int):
    """(rank part, held-out part) of the clean set, stratified; both the whole set if too small."""
    per_class = int(clean.per_class * fraction)
    if per_class < 1 or fraction <= 0:
        return clean, clean
    held = stratified_pick(clean.y.cpu(), clean.num_classes, per_class=per_class, seed=seed)
    keep = torch.ones(len(clean), dtype=torch.bool)
    keep[held] = False
    from ..data.core import CleanSet

    sub = lambda idx: CleanSet(clean.x[idx], clean.y[idx], clean.num_classes, clean.augment)  # noqa: E731
    return sub(keep.nonzero().flatten()), sub(held)


@torch.no_grad()
def head_input_means(model, head, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    acts = []
    h = head.register_forward_hook(lambda m, i, o: acts.append(i[0].detach().flatten(1).sum(0)))
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        h.remove()
    return torch.stack(acts).sum(0) / len(x)


@DEFENSES.register("fp")
def defend_fp(model, clean, cfg: FPConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, FPConfig) else config_with(FPConfig, cfg or {})
    model, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    head = last_linear(model)
    rank_set, val_set = split_clean(clean, cfg.val_fraction, runtime.seed)
    means = head_input_means(model, head, rank_set.x.to(runtime.torch_device))
    order = torch.argsort(means)  # ascending: least active first
    d = len(order)
    step = max(1, math.ceil(d * cfg.once_prune_ratio))
    keep = torch.ones(d, device=head.weight.device)
    parametrize.register_parametrization(head, "weight", ChannelMask(keep, 2, full_shape=True), unsafe=True)
    base_acc = clean_accuracy(model, val_set, runtime)
    pruned, trace = 0, []
    for k in range(step, d + 1, step):
        keep.fill_(1.0)
        keep[order[:k]] = 0.0
        acc = clean_accuracy(model, val_set, runtime)
        trace.append({"pruned": k, "val_acc": acc})
        if base_acc - acc >= cfg.acc_ratio * base_acc:
            break
        pruned = k
    keep.fill_(1.0)
    keep[order[:pruned]] = 0.0  # the mask stays through fine-tuning: pruned columns remain zero
    history = fine_tune(model, clean, runtime, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, steps=cfg.steps, augment=cfg.augment,
                        monitor=monitor, desc="fp")
    parametrize.remove_parametrizations(head, "weight", leave_parametrized=True)
    model.eval()
    extras = {"seconds": time.perf_counter() - t0, "config": asdict(cfg), "channels": d, "pruned": pruned,
              "pruned_index": order[:pruned].tolist(), "val_images": len(val_set), "val_acc_unpruned": base_acc,
              "prune_trace": trace}
    return DefenseResult(model, history, extras)
