"""NFT's final BatchNorm step: statistics re-estimated from plain clean batches, or the model's own
statistics moved by what the masks changed (benchmarks/NOTES.md §2, §5)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import augment as A
from .data.core import CleanSet
from .runtime import Runtime


@torch.no_grad()
def recalibrate_bn(model: nn.Module, clean: CleanSet, cfg: NFTConfig, runtime: Runtime, perturb=None) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over ``cfg.bn_recal`` batches of
    clean images with the standard augmentation only. MixUp batches have less variance than real
    images, so statistics gathered during mask training are biased (benchmarks/NOTES.md §2).
    ``perturb(x) -> x``, if given, edits each augmented batch (``perturbed_share``)."""
    bns = list(_tracking_bns(model).values())
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    base = A.train_transform(cfg.augment or clean.augment)
    g = runtime.generator(505, device=runtime.device)
    gi = runtime.generator(506)
    model.train()
    for _ in range(cfg.bn_recal):
        idx = torch.randint(0, len(clean), (cfg.batch_size,), generator=gi)
        x = base(clean.x[idx].to(runtime.torch_device), g)
        model(x if perturb is None else perturb(x))
    for m, mom in zip(bns, saved):
        m.momentum = mom


def _tracking_bns(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _bn_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in _tracking_bns(model).items()}


@torch.no_grad()
def transfer_bn_delta(original: nn.Module, model: nn.Module, clean: CleanSet, cfg: NFTConfig, runtime: Runtime,
                      perturb=None) -> None:
    """Give ``model`` the statistics of ``original`` (estimated on its full training data) moved by
    what the masks changed: mean + (after - before), var * (after / before), where before/after are
    estimated from the same clean batches with the original and the masked model. The bias of a tiny
    clean set (ten images say little about the variance of a class) cancels in the difference."""
    own = _bn_stats(original)
    ref = copy.deepcopy(original).to(runtime.torch_device)
    recalibrate_bn(ref, clean, cfg, runtime)
    before = _bn_stats(ref)
    recalibrate_bn(model, clean, cfg, runtime, perturb)  # (the original's estimate stays plain)
    for n, m in _tracking_bns(model).items():
        if n in own:
            (mu, var), (mu0, var0) = own[n], before[n]
            m.running_mean.copy_(mu.to(m.running_mean) + m.running_mean - mu0)
            m.running_var.copy_(var.to(m.running_var) * (m.running_var + 1e-5) / (var0 + 1e-5))


def reestimate_bn(original: nn.Module, model: nn.Module, clean: CleanSet, cfg: NFTConfig, runtime: Runtime,
                  searches=()) -> None:
    """The final BN step of ``cfg``: re-estimate from ``cfg.bn_recal`` plain clean batches, or
    (``bn_recal_mode='delta'``) move ``original``'s statistics by what the masks changed. With
    ``cfg.bn_recal_adv``, ``searches`` (perturbations with ``apply``) edit the purified model's batches."""
    perturb = perturbed_share(searches, cfg.bn_recal_adv)
    if cfg.bn_recal_mode == "delta":
        transfer_bn_delta(original, model, clean, cfg, runtime, perturb)
    else:
        recalibrate_bn(model, clean, cfg, runtime, perturb)


def perturbed_share(searches, share: float):
    """``x -> x`` with the last ``share`` of the batch's images carrying each search's perturbation in
    turn (a share each), or None when there is nothing to apply."""
    searches = [s for s in searches if s is not None and hasattr(s, "apply")]
    if share <= 0 or not searches:
        return None

    def perturb(x):
        k = max(1, round(share * len(x)))
        parts, end = [], len(x)
        for s in reversed(searches):  # the first search's images first
            start = max(0, end - k)
            parts.insert(0, s.apply(x[start:end]))
            end = start
        return torch.cat([x[:end], *parts])

    return perturb
