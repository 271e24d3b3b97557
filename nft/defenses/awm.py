"""AWM: Adversarial Weight Masking (Chai & Chen, NeurIPS 2022); official jinghuichen/AWM.

An element-wise mask m in [0, 1] on every conv weight (w_eff = w * m; a model without conv layers
gets them on its linear layers except the head), the model in eval mode throughout. Per outer round:

1. inner: a universal perturbation delta (1 x C x H x W) from 0, SGD (lr 10) maximising
   CE(f(clip(x + delta)), argmax f(x)) for ``inner_iters`` = floor(n / batch) * 5 batches, kept
   in the L1 ball of radius ``trigger_norm`` (1000 at 3x32x32; scaled here by pixels / 3072, the
   same mean |delta| per pixel) by rescaling after every step;
2. masks: as many Adam steps on alpha * CE(f(x), y) + (1 - alpha) * CE(f(clip(x + delta)), y)
   + gamma * ||m||_1, clipping m to [0, 1].

The masks reuse nft.masks' parametrization (ChannelMask with a full-shape mask) and are folded
into the weights at the end. One-shot (<= 1 image per class, the official 'samples = C' case):
every image gets ``expand`` extra augmented copies first (the official CenterCrop /
RandomResizedCrop / flip; here the clean set's standard augmentation).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .. import augment as A
from ..engine import Hooks, train
from ..masks import LAYER_TYPES, ChannelMask, Masks, MaskSite
from ..models import last_linear
from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import augmenter, clean_tensors, prepare


@dataclass
class AWMConfig:
    outer: int = 20  # official --outer
    inner_mult: int = 5  # official: inner_iters = floor(n / batch) * 5
    batch_size: int = 128  # official
    inner_lr: float = 10.0  # official: SGD lr on delta
    trigger_norm: float = 1000.0  # official L1 radius at 3x32x32 (README: 100 for few-shot), scaled by pixels / 3072
    lr: float = 1e-2  # official: Adam on the masks
    alpha: float = 0.9  # official: weight of the clean loss
    gamma: float = 1e-8  # official: weight of ||m||_1
    expand: int = 9  # official one-shot: augmented copies per image when there is <= 1 image per class
    augment: str | None = "none"  # official: no augmentation during the optimisation


def attach_elementwise(model: nn.Module) -> Masks:
    """An element-wise mask on every conv weight (or linear, except the head, if there is no conv)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        head = last_linear(model)
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and m is not head]
    sites = []
    for name, m in convs:
        mask = nn.Parameter(torch.ones_like(m.weight, dtype=torch.float32))
        parametrize.register_parametrization(m, "weight", ChannelMask(mask, m.weight.dim(), full_shape=True), unsafe=True)
        sites.append(MaskSite(name, "element", m, mask))
    return Masks(model, sites, "element")


def expand_one_shot(x, y, copies: int, augment: str, g):
    t = A.train_transform(augment)
    xs = [x] + [t(x, g) for _ in range(copies)]
    return torch.cat(xs), y.repeat(copies + 1)


@DEFENSES.register("awm")
def defend_awm(model, clean, cfg: AWMConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, AWMConfig) else config_with(AWMConfig, cfg or {})
    model, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    masks = attach_elementwise(model)
    x, y = clean_tensors(clean, runtime)
    if clean.per_class <= 1 and cfg.expand > 0:
        x, y = expand_one_shot(x, y, cfg.expand, clean.augment, runtime.generator(901, device=runtime.device))
    batch = min(cfg.batch_size, len(y))
    iters = max(1, len(y) // batch) * cfg.inner_mult
    radius = cfg.trigger_norm * x[0].numel() / 3072
    mopt = torch.optim.Adam(masks.parameters(), lr=cfg.lr)
    history, rounds = [], []
    for r in range(cfg.outer):
        delta = torch.zeros((1, *x.shape[1:]), device=x.device, requires_grad=True)
        dopt = torch.optim.SGD([delta], lr=cfg.inner_lr)

        def inner(m, xb, yb, step):
            with torch.no_grad():
                pseudo = m(xb).argmax(1)
            return -F.cross_entropy(m((xb + delta).clamp(0, 1)), pseudo)

        def project(step, info):
            with torch.no_grad():
                delta.mul_(min(1.0, radius / (float(delta.abs().sum()) + 1e-12)))

        for s in masks.sites:
            s.mask.requires_grad_(False)
        hooks = Hooks(transform=augmenter(clean, runtime, cfg.augment, 30 + r), loss=inner, after_step=project)
        history += [{"phase": "inner", "round": r, **h} for h in
                    train(model, x, y, dopt, runtime, iters, batch, None, hooks, replacement=False, train_mode=False,
                          desc="awm-inner", log_every=iters, generator_offset=930 + r)]
        for s in masks.sites:
            s.mask.requires_grad_(True)
        d = delta.detach()

        def outer(m, xb, yb, step):
            return (cfg.alpha * F.cross_entropy(m(xb), yb)
                    + (1 - cfg.alpha) * F.cross_entropy(m((xb + d).clamp(0, 1)), yb)
                    + cfg.gamma * sum(s.mask.abs().sum() for s in masks.sites))

        hooks = Hooks(transform=augmenter(clean, runtime, cfg.augment, 60 + r), loss=outer,
                      after_step=lambda s, info: masks.clip_(0.0, 1.0))
        history += [{"phase": "mask", "round": r, **h} for h in
                    train(model, x, y, mopt, runtime, iters, batch, None, hooks, replacement=False, train_mode=False,
                          desc="awm-mask", log_every=iters, generator_offset=960 + r)]
        rounds.append({"round": r, "delta_l1": float(d.abs().sum())})
        if monitor is not None:
            history.append({"round": r, **monitor(model)})
    values = masks.values()
    extras = {"seconds": time.perf_counter() - t0, "config": asdict(cfg), "rounds": rounds, "radius": radius,
              "mask_entries": int(values.numel()), "mask_mean": float(values.mean()),
              "masks_below_0.5": int((values < 0.5).sum()), "images": len(y)}
    masks.fold()
    model.eval()
    return DefenseResult(model, history, extras)
