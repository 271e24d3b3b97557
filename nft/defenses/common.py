"""Pieces shared by the baseline defenses: the step rule, fine-tuning through ``engine.train``,
gradient surrogates, neuron sites and pruning.

The step rule (every baseline)
------------------------------
Each baseline's schedule is its reference recipe's, written in **epochs over the clean set**
(``epochs`` in its config; for recipes given in iterations, such as ANP's 2,000 steps of 128 on
500 images, epochs = iterations x batch / reference size). On a clean set of n images a run takes

    batch = min(batch_size, n)        steps = ceil(epochs * n / batch)

batches drawn with replacement. At the reference size this is the reference recipe step for
step (BackdoorBench's 2,500 images at batch 256 and 100 epochs -> 977 steps); with fewer images
the number of steps shrinks in proportion, so one sample per class (10 images) still gives a
sensible, short run (100 epochs -> 100 steps of 10) instead of hundreds of passes over the same
ten images. Every config also takes ``steps`` to set the count directly.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import augment as A
from ..data.core import CleanSet
from ..engine import Hooks, cosine_schedule, predict, train
from ..masks import find_sites
from ..runtime import Runtime


def epoch_steps(n: int, epochs: float, batch_size: int, steps: int | None = None) -> tuple[int, int]:
    """(steps, batch) by the step rule above; ``steps`` overrides the count."""
    batch = max(1, min(batch_size, n))
    if steps is not None:
        return max(1, int(steps)), batch
    return max(1, math.ceil(epochs * n / batch)), batch


def prepare(model: nn.Module, runtime: Runtime | None) -> tuple[nn.Module, Runtime]:
    """A deep copy of ``model`` on the runtime's device (the input model is never modified)."""
    runtime = runtime or Runtime()
    return copy.deepcopy(model).to(runtime.torch_device).eval(), runtime


def clean_tensors(clean: CleanSet, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    return clean.x.to(runtime.torch_device), clean.y.to(runtime.torch_device)


def augmenter(clean: CleanSet, runtime: Runtime, name: str | None = None, offset: int = 0):
    """The engine transform for the clean set's standard augmentation (or ``name``)."""
    base = A.train_transform(name or clean.augment)
    g = runtime.generator(700 + offset, device=runtime.device)
    return lambda x, y, step: (base(x, g), y)


def monitor_hooks(monitor, model: nn.Module, every: int) -> dict:
    """Hooks fields that log the runner's evaluation along training (never used for decisions)."""
    if monitor is None:
        return {}
    return {"evaluate": lambda step: monitor(model), "eval_every": every}


def sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def fine_tune(model: nn.Module, clean: CleanSet, runtime: Runtime, *, epochs: float, batch_size: int, lr: float,
              momentum: float = 0.9, weight_decay: float = 5e-4, steps: int | None = None, loss=None,
              after_step=None, augment: str | None = None, lr_lambda=None, monitor=None, desc: str = "ft",
              offset: int = 0) -> list[dict]:
    """SGD on all trainable weights with CE (or ``loss``), standard augmentation and a per-step cosine
    schedule (or ``lr_lambda(step)`` as a multiplier), by the step rule."""
    n_steps, batch = epoch_steps(len(clean), epochs, batch_size, steps)
    opt = sgd(model.parameters(), lr, momentum, weight_decay)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda is not None
             else cosine_schedule(opt, n_steps))
    hooks = Hooks(transform=augmenter(clean, runtime, augment, offset), loss=loss, after_step=after_step,
                  **monitor_hooks(monitor, model, max(1, n_steps // 5)))
    x, y = clean_tensors(clean, runtime)
    return train(model, x, y, opt, runtime, n_steps, batch, sched, hooks, replacement=True, desc=desc,
                 log_every=max(1, min(10, n_steps)), generator_offset=900 + offset)


def surrogate(value: torch.Tensor, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient with respect to ``params`` is ``grads``.

    It lets a defense that computes its own gradient (SAM's, I-BAU's hypergradient) hand it to the
    one training loop, which calls ``backward()`` on whatever the loss hook returns.
    """
    lin = sum((p * g.detach()).sum() for p, g in zip(params, grads) if g is not None)
    return value.detach() + lin - lin.detach()


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Forward passes inside do not update BatchNorm running statistics (train mode still uses
    batch statistics)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def neuron_sites(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """The "neurons" of ANP/RNP: the affine weight of every norm layer (BN/GN/LN), or, for a model
    without norm layers, the output channels of its conv/linear layers (nft.masks' 'auto' sites)."""
    return find_sites(model, "norm") or find_sites(model, "auto")


@torch.no_grad()
def prune_neurons(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> dict[str, int]:
    """Zero the weight (BN gamma, or a conv/linear output row) of every neuron whose mask value is
    <= ``threshold``. ``masks`` maps module names to mask tensors (per weight entry of a norm layer,
    per output channel of a conv/linear). Returns the count pruned per layer."""
    modules = dict(model.named_modules())
    pruned = {}
    for name, m in masks.items():
        w = modules[name].weight
        off = (m.to(w.device) <= threshold)
        if off.shape != w.shape:  # channel mask of a conv/linear: whole output rows
            off = off.view((-1,) + (1,) * (w.dim() - 1)).expand_as(w)
            pruned[name] = int((m <= threshold).sum())
        else:
            pruned[name] = int(off.sum())
        w[off] = 0.0
    return pruned


def clean_accuracy(model: nn.Module, clean: CleanSet, runtime: Runtime) -> float:
    return float((predict(model, clean.x, runtime) == clean.y.cpu()).float().mean())


def mean_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Mean cross-entropy in the model's current mode, without gradients."""
    with torch.no_grad():
        tot = sum(float(F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum"))
                  for i in range(0, len(y), batch))
    return tot / max(1, len(y))
