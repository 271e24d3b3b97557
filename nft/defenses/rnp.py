"""RNP: Reconstructive Neuron Pruning (Li et al., ICML 2023); official bboylyg/RNP.

1. Unlearn: gradient *ascent* on clean CE over all weights of a copy, epoch by epoch, until the
   epoch's clean training accuracy is <= ``clean_threshold`` (or ``unlearn_epochs`` have run).
2. Recover: freeze the unlearned weights, put a mask on every neuron (nft.masks: the norm layers'
   weights, or conv/linear output channels in a model without norm layers), and minimise
   alpha * CE on the clean set, clipping the masks to [0, 1]. Neurons the unlearned model needs to
   recover stay near 1; those the backdoor lives in are pushed down.
3. Prune the *original* model: zero the weight of every neuron whose mask is <= ``threshold``.

The threshold is fixed (0.2, as ANP; never chosen on test or poisoned data). The official code
sweeps thresholds 0-0.9 against test ASR; BackdoorBench fixes a pruning number instead.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..engine import Hooks, train
from ..masks import attach
from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import (augmenter, clean_accuracy, clean_tensors, epoch_steps, monitor_hooks, neuron_sites, prepare,
                     prune_neurons, sgd)


@dataclass
class RNPConfig:
    unlearn_lr: float = 0.01  # official: SGD lr 0.01
    unlearn_momentum: float = 0.9  # official
    unlearn_weight_decay: float = 5e-4  # official
    unlearn_epochs: int = 20  # official: at most 20 epochs (epochs over the clean set; step rule, common.py)
    unlearn_milestones: tuple = (10, 20)  # official MultiStepLR x0.1
    clean_threshold: float = 0.2  # official: stop unlearning once the epoch's clean train accuracy <= 0.2
    recover_lr: float = 0.2  # official mask lr
    recover_momentum: float = 0.9  # official
    recover_epochs: float = 20  # official
    alpha: float = 0.2  # official: the recovery loss is alpha * CE
    threshold: float = 0.2  # fixed pruning threshold (masks <= 0.2 are pruned)
    batch_size: int = 128  # official
    augment: str | None = None  # None: the clean set's standard augmentation


def unlearn(model, clean, cfg: RNPConfig, runtime):
    """Gradient ascent, one epoch per engine.train call, until the clean train accuracy is low enough."""
    steps, batch = epoch_steps(len(clean), 1, cfg.batch_size)
    opt = sgd(model.parameters(), cfg.unlearn_lr, cfg.unlearn_momentum, cfg.unlearn_weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps for m in cfg.unlearn_milestones], 0.1)
    x, y = clean_tensors(clean, runtime)
    seen = {"correct": 0, "total": 0}

    def loss(m, xb, yb, step):
        logits = m(xb)
        seen["correct"] += int((logits.argmax(1) == yb).sum())
        seen["total"] += len(yb)
        return -F.cross_entropy(logits, yb)

    history, trace = [], []
    for epoch in range(cfg.unlearn_epochs):
        seen.update(correct=0, total=0)
        hooks = Hooks(transform=augmenter(clean, runtime, cfg.augment, epoch), loss=loss)
        history += [{"phase": "unlearn", "epoch": epoch, **h} for h in
                    train(model, x, y, opt, runtime, steps, batch, sched, hooks, replacement=True,
                          desc="rnp-unlearn", log_every=steps, generator_offset=600 + epoch)]
        acc = seen["correct"] / max(1, seen["total"])
        trace.append(acc)
        if acc <= cfg.clean_threshold:
            break
    return history, trace


@DEFENSES.register("rnp")
def defend_rnp(model, clean, cfg: RNPConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, RNPConfig) else config_with(RNPConfig, cfg or {})
    original, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    work, _ = prepare(original, runtime)
    acc_before = clean_accuracy(work, clean, runtime)
    history, train_acc = unlearn(work, clean, cfg, runtime)
    acc_unlearned = clean_accuracy(work, clean, runtime)

    for p in work.parameters():
        p.requires_grad_(False)
    where = "norm" if neuron_sites(work)[0][1] == "norm" else "auto"
    masks = attach(work, where)
    opt = torch.optim.SGD(masks.parameters(), lr=cfg.recover_lr, momentum=cfg.recover_momentum)
    steps, batch = epoch_steps(len(clean), cfg.recover_epochs, cfg.batch_size)
    hooks = Hooks(transform=augmenter(clean, runtime, cfg.augment, 99),
                  loss=lambda m, xb, yb, s: cfg.alpha * F.cross_entropy(m(xb), yb),
                  after_step=lambda s, info: masks.clip_(0.0, 1.0), **monitor_hooks(monitor, work, max(1, steps // 5)))
    x, y = clean_tensors(clean, runtime)
    history += [{"phase": "recover", **h} for h in
                train(work, x, y, opt, runtime, steps, batch, None, hooks, replacement=True, desc="rnp-recover",
                      log_every=max(1, min(10, steps)), generator_offset=650)]
    acc_recovered = clean_accuracy(work, clean, runtime)
    state = masks.state_dict()
    pruned = prune_neurons(original, state, cfg.threshold)
    extras = {"seconds": time.perf_counter() - t0, "config": asdict(cfg), "mask_state": state,
              "unlearn_epochs_run": len(train_acc), "unlearn_train_acc": train_acc,
              "clean_acc_before": acc_before, "clean_acc_unlearned": acc_unlearned,
              "clean_acc_recovered": acc_recovered, "neurons": masks.numel, "pruned": int(sum(pruned.values())),
              "pruned_per_layer": pruned}
    return DefenseResult(original.eval(), history, extras)
