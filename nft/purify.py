"""NFT: Neural mask Fine-Tuning (Karim et al., ECCV 2024), as plain functions over masks + augment + engine.

One multiplicative mask per channel is learned on a small clean set, the weights stay frozen:

    min_m  CE(f_m(mixup(x)), mixup(y)) + (l1 / N_c) * ||1 - m||_1,   m clipped to [alpha e^(-beta l), 1]

Two named recipes (``RECIPES``): ``paper`` is the seed repository's settings (spec §1, without its
bugs); ``default`` is what this project recommends (benchmarks/NOTES.md says why).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, replace

import torch
import torch.nn as nn

from . import augment as A
from .bn import recalibrate_bn, reestimate_bn, transfer_bn_delta  # noqa: F401 (their home was here)
from .data.core import CleanSet
from .engine import Hooks, NonFiniteLoss, cosine_schedule, train
from .errors import NFTError
from .masks import Masks, attach, clip_schedule
from .recovery import clean_gap
from .nft_config import RECIPES, NFTConfig, for_clean_set, recipe, validate  # noqa: F401 (their home was here)
from .nft_config import searching as in_search  # 'searching' is a local name in make_transform
from .runtime import Runtime
from .searches import (ImagePerturbation, NeuronPerturbation, PatchPerturbation, SparsePerturbation, UniversalPerturbation,
                       composite_probe, patch_probe, targeted_probe)


def _scheduler(opt, cfg: NFTConfig):
    if cfg.schedule == "cosine":
        return cosine_schedule(opt, cfg.steps, cfg.eta_min)
    if cfg.schedule == "seed":  # CosineAnnealingLR(T_max=5, eta_min) stepped once per 200-step block
        blocks, base = 5, cfg.lr
        block_len = max(1, math.ceil(cfg.steps / blocks))

        def f(s):
            k = min(s // block_len, blocks - 1)
            if base <= 0:
                return 1.0
            return (cfg.eta_min + (base - cfg.eta_min) * (1 + math.cos(math.pi * k / blocks)) / 2) / base

        return torch.optim.lr_scheduler.LambdaLR(opt, f)
    if cfg.schedule == "constant":
        return None
    raise NFTError(f"unknown schedule {cfg.schedule!r}")


def make_transform(cfg: NFTConfig, clean: CleanSet, g: torch.Generator, model: nn.Module | None = None,
                   pairs: list | None = None, gc: torch.Generator | None = None, target: int | None = None):
    """standard augmentation -> random noise patches (optional) -> MixUp, plus (optional) extra
    images carrying a universal adversarial perturbation with their true labels, plus (``pairs``
    from ``composite_probe``, drawn with the CPU generator ``gc``) ``cfg.composites`` of a batch of
    half-and-half composites of those pairs' clean images, labelled half each class, at the end
    (``transform.extra`` of them). With ``cfg.wide`` a second universal perturbation in a wider ball
    adds ``transform.away`` images just before the composites (``make_loss`` gives them the 'away' loss)."""
    base = A.train_transform(cfg.augment or clean.augment)
    shape = tuple(clean.x.shape[1:])
    adv = None if cfg.adv <= 0 or model is None else (
        ImagePerturbation(shape, cfg.adv_eps, cfg.adv_image_steps, g) if cfg.adv_mode == "image"
        else (SparsePerturbation if cfg.adv_norm == "l1" else UniversalPerturbation)(
            shape, cfg.adv_eps, cfg.adv_step, g.device, g, cfg.adv_starts))
    wide = None if cfg.wide <= 0 or model is None else (
        PatchPerturbation(shape, cfg.wide_side, cfg.wide_grid, cfg.wide_step, g.device, g,
                          None if cfg.wide_window < 0 else cfg.wide_window, cfg.wide_corners) if cfg.wide_norm == "patch"
        else UniversalPerturbation(shape, cfg.wide_eps, cfg.adv_step, g.device, g))

    def transform(x, y, step):
        searching = in_search(cfg, step, cfg.adv_until)
        t = None if cfg.recover_target_keep >= 1 or adv is None or searching else (
            cfg.wide_target if cfg.wide > 0 and cfg.wide_target >= 0 else target if target is not None else adv.target)
        if t is not None and cfg.recover_target_gap >= 0 and behind(t):
            t = None
        if t is not None:
            keep = (y != t) | (torch.rand(len(y), generator=g, device=g.device) < cfg.recover_target_keep).to(y.device)
            if bool(keep.any()):
                x, y = x[keep], y[keep]
        transform.clean = len(x)  # the first images of the batch are clean (MixUp); the rest carry delta
        x = base(x, g)
        if cfg.patches > 0:
            x = A.random_patches(x, g, cfg.patches, *cfg.patch_size)
        mix = A.cutmix if cfg.cutmix > 0 and float(torch.rand((), generator=g, device=g.device)) < cfg.cutmix \
            else A.mixup
        xm, ym = mix(x, y, clean.num_classes, cfg.mixup_alpha, g)
        if adv is not None and (searching or cfg.adv_after > 0):
            k = max(1, round((cfg.adv if searching else cfg.adv_after) * len(x)))
            if cfg.adv_frozen and not searching:
                xa = adv.apply(x[:k])
            elif cfg.adv_free:
                xa = adv.attach(x[:k])
            else:
                xa = adv.update(model, x[:k], y[:k])
            xm = torch.cat([xm, xa])
            ym = torch.cat([ym, A.soft_targets(y[:k], clean.num_classes)])
        transform.away = 0
        if wide is not None and (searching or cfg.adv_after > 0):
            k = max(1, round((cfg.wide if searching else cfg.adv_after) * len(x)))
            xm = torch.cat([xm, wide.update(model, x[-k:], y[-k:])])
            ym = torch.cat([ym, A.soft_targets(y[-k:], clean.num_classes)])
            transform.away = k
        transform.extra = 0
        if pairs:
            n = max(1, round(cfg.composites * len(x)))
            which = torch.randint(0, len(pairs), (n,), generator=gc)
            pick = lambda c: members[c][torch.randint(0, len(members[c]), (1,), generator=gc)]  # noqa: E731
            ia = torch.cat([pick(pairs[int(i)][0]) for i in which])
            ib = torch.cat([pick(pairs[int(i)][1]) for i in which])
            comp = A.half_mix(clean.x[ia], clean.x[ib], gc, jitter).to(xm.device)
            yc = 0.5 * (A.soft_targets(clean.y[ia], clean.num_classes) + A.soft_targets(clean.y[ib], clean.num_classes))
            xm, ym = torch.cat([xm, comp]), torch.cat([ym, yc.to(ym.device)])
            transform.extra = n
        return xm, ym

    @torch.no_grad()
    def class_acc(t):  # the model's accuracy (eval mode) on the clean set's images of class t, in points
        was, xt = model.training, clean.x[clean.y == t].to(g.device)
        model.eval()
        acc = 100.0 * float((model(xt).argmax(1).cpu() == t).float().mean()) if len(xt) else 100.0
        model.train(was)
        return acc

    reference = {}  # class -> the original's accuracy on it (masks at 1, before any step)

    def behind(t):
        return class_acc(t) < reference[t] - cfg.recover_target_gap

    if cfg.recover_target_gap >= 0 and adv is not None:
        reference.update({c: class_acc(c) for c in range(clean.num_classes)})
    members = {c: (clean.y == c).nonzero().flatten() for c in {c for p in pairs or [] for c in p[:2]}}
    jitter = A.half_mix_jitter(shape)
    transform.clean = transform.extra = transform.away = 0
    transform.adv, transform.wide = adv, wide
    return transform


def make_loss(cfg: NFTConfig, teacher: nn.Module | None, transform, neurons: NeuronPerturbation | None = None):
    """Cross-entropy on soft targets, plus (``cfg.kd`` > 0) distillation from the original model on
    the clean part of the batch only (on images that carry the perturbation it would teach the
    backdoor), mixed (``cfg.neuron`` > 0) with the loss under adversarial neuron perturbation.
    ``cfg.adv_loss='away'``: the images that carry the input perturbation get ``away_loss`` instead.
    ``cfg.wide``: the ``transform.away`` rows of the wider search get ``away_loss`` (the others keep theirs) and
    stay out of the neuron-perturbed loss; ``wide_bn='eval'`` passes them apart, with BN's running statistics."""
    kd = cfg.kd and teacher is not None
    away = cfg.adv_loss == "away"
    if not kd and neurons is None and not away and cfg.wide <= 0:
        return None
    T = cfg.kd_temp

    def loss(model, x, y, step):
        w = cfg.neuron if in_search(cfg, step, cfg.neuron_until) else cfg.neuron_after
        perturbed = neurons is not None and w > 0
        c, e, a = transform.clean, getattr(transform, "extra", 0), getattr(transform, "away", 0)
        split = away and 0 < c < len(x) - e  # rows c: len(x) - e carry the perturbation, the last e are composites
        rest = None
        if a and not split:  # rows n - e - a: n - e carry the wide perturbation and take the 'away' loss
            rest = torch.ones(len(x), dtype=torch.bool, device=x.device)
            rest[len(x) - e - a:len(x) - e] = False
        k = c if cfg.neuron_part == "adv" and 0 < c < len(x) else 0
        if perturbed and w == 1 and not kd and not k and not split and rest is None:  # the unperturbed loss has
            return neurons.loss(model, x, y)  # weight 0: skip its pass
        if rest is not None and cfg.wide_bn == "eval":
            o_rest = model(x[rest])  # rows before the wide ones come first: o_rest[:c] is the clean part
            was = model.training
            model.eval()
            o_wide = model(x[~rest])
            model.train(was)
        elif rest is not None:
            out = model(x)
            o_rest, o_wide = out[rest], out[~rest]
        else:
            out = model(x)
        if rest is not None:
            total = (nn.functional.cross_entropy(o_rest, y[rest], reduction="sum")
                     + a * away_loss(o_wide, y[~rest], cfg.wide_flipped,
                                     None if cfg.wide_target < 0 else cfg.wide_target)) / len(x)
        elif split:
            n = len(x)
            total = c * nn.functional.cross_entropy(out[:c], y[:c]) + (n - c - e) * away_loss(out[c:n - e], y[c:n - e])
            if e:
                total = total + e * nn.functional.cross_entropy(out[n - e:], y[n - e:])
            total = total / n
        else:
            total = nn.functional.cross_entropy(out, y)
        if kd:
            c = transform.clean
            with torch.no_grad():
                p = nn.functional.softmax(teacher(x[:c]) / T, 1)
            head = (o_rest if rest is not None else out)[:c]
            kl = nn.functional.kl_div(nn.functional.log_softmax(head / T, 1), p, reduction="batchmean")
            total = total + cfg.kd * T * T * kl
        if perturbed:  # with the 'away' loss the neuron search sees the clean rows only, and never the wide rows
            if split:
                nl = neurons.loss(model, x[:c], y[:c])
            elif rest is not None:
                keep = rest.clone()
                keep[:k] = False
                nl = neurons.loss(model, x[keep], y[keep])
            else:
                nl = neurons.loss(model, x[k:], y[k:])
            total = (1 - w) * total + w * nl
        return total

    return loss


def away_loss(out: torch.Tensor, y: torch.Tensor, flipped: bool = False, t: int | None = None) -> torch.Tensor:
    """-log(1 - p_t), averaged over the images not of class t, where t is the class most of these
    (perturbed) images are predicted as (or the ``t`` given): what a universal perturbation that finds a
    backdoor does is send them to its target; this undoes only that. ``y``: labels or soft targets (argmax = label).
    ``flipped``: only the images still predicted as t count (the sum is still divided by all not of t)."""
    p = nn.functional.softmax(out, 1)
    pred = out.detach().argmax(1)
    t = int(torch.mode(pred).values) if t is None else t
    keep = (y.argmax(1) if y.dim() == 2 else y) != t
    if flipped:
        n = int(keep.sum())
        keep = keep & (pred == t)
        if not keep.any():
            return out.sum() * 0.0
        return -torch.log((1 - p[keep, t]).clamp_min(1e-6)).sum() / n
    if not keep.any():
        return out.sum() * 0.0
    return -torch.log((1 - p[keep, t]).clamp_min(1e-6)).mean()


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


@torch.no_grad()
def _restore(masks: Masks, model: nn.Module, state: tuple) -> None:
    """Put back a (mask state or None, buffers) pair taken with ``masks.state_dict()`` and ``_buffers``."""
    if state[0] is not None:
        masks.load_state_dict(state[0])
    for k, b in model.named_buffers():
        b.copy_(state[1][k])


def _shifted(hooks: Hooks, start: int) -> Hooks:
    """``hooks`` for a run that goes on after step ``start`` (the step-dependent hooks see the global step)."""
    return Hooks(transform=hooks.transform and (lambda x, y, s: hooks.transform(x, y, s + start)),
                 loss=hooks.loss and (lambda m, x, y, s: hooks.loss(m, x, y, s + start)), penalty=hooks.penalty,
                 after_step=hooks.after_step and (lambda s, info: hooks.after_step(s + start, info)),
                 evaluate=hooks.evaluate and (lambda s: hooks.evaluate(s + start)), eval_every=hooks.eval_every)


def purify(model: nn.Module, clean: CleanSet, cfg: NFTConfig | None = None, runtime: Runtime | None = None,
           monitor=None) -> tuple[nn.Module, Masks, list[dict], dict]:
    """Learn masks on ``clean`` and return (purified model with masks folded in, masks, history, extras).

    ``model`` is not modified. ``monitor(model) -> dict`` is the caller's evaluation (its sets are
    never seen by NFT); it is called every ``cfg.eval_every`` steps with the masks in place.
    """
    cfg = for_clean_set(validate(cfg or recipe("default")), clean.per_class)
    runtime = runtime or Runtime()
    original, model = model, copy.deepcopy(model).to(runtime.torch_device)
    for p in model.parameters():
        p.requires_grad_(False)
    probe = None
    if cfg.composites > 0:  # on the model as given, before any mask
        probe = composite_probe(model, clean.x, clean.y, clean.num_classes, cfg.composite_k, cfg.composite_share,
                                runtime.generator(707), cfg.composite_index)
        if probe["pairs"] and cfg.composite_found:
            cfg = replace(cfg, **cfg.composite_found)
    patches = None
    if cfg.patch_probe > 0:  # on the model as given, before any mask
        patches = patch_probe(model, clean.x, clean.y, cfg.wide_side, cfg.wide_grid, cfg.wide_step, cfg.patch_probe_steps,
                              16 * cfg.wide_grid ** 2, runtime.generator(709), cfg.wide_corners)
        patches["flagged"] = [w for w, (share, _) in enumerate(patches["windows"]) if share >= cfg.patch_probe
                              and patches["median"] <= cfg.patch_probe_median]
        if patches["flagged"]:
            cfg = validate(replace(cfg, **{"wide_norm": "patch", "wide_window": patches["window"],
                                           "wide_target": patches["to"], **cfg.patch_found}))
    targeted = None
    if cfg.target_probe > 0:  # on the model as given, before any mask
        targeted = targeted_probe(model, clean.x, clean.y, clean.num_classes, cfg.target_probe, cfg.adv_step,
                                  cfg.target_probe_steps, cfg.batch_size, runtime.generator(710))
    masks = attach(model, cfg.where)
    if cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    lower = clip_schedule(len(masks.sites), cfg.clip_alpha, cfg.clip_beta)
    opt = (torch.optim.Adam(masks.parameters(), lr=cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(masks.parameters(), lr=cfg.lr, momentum=cfg.momentum))
    l1_weight = cfg.l1 / clean.per_class if cfg.l1_per_class else cfg.l1
    # "Good" = masks and BN statistics whose forward pass gave a finite loss. A step's state is
    # confirmed when the next step's loss comes out finite; on a non-finite loss we roll back to it.
    snapshot = lambda: (masks.state_dict(), _buffers(model))  # noqa: E731
    good, pending = snapshot(), None

    transform = make_transform(cfg, clean, runtime.generator(303, device=runtime.device), model,
                               probe and probe["pairs"], runtime.generator(708), targeted and targeted["to"])

    held = None  # (which entries, their values) per site, once the search has ended (hold_below)
    hold_from = max(1, round(cfg.adv_until * cfg.steps)) if cfg.hold_below > 0 else None

    def after_step(step, info):
        nonlocal good, pending, held
        if pending is not None:
            good = pending
        masks.clip_(lower)
        if hold_from is not None and step >= hold_from:
            with torch.no_grad():
                if held is None:
                    held = [((s.mask <= cfg.hold_below).clone(), s.mask.detach().clone()) for s in masks.sites]
                for s, (which, value) in zip(masks.sites, held):
                    s.mask[which] = value[which]
        if transform.adv is not None:
            transform.adv.ascend()
        pending = snapshot()

    teacher = copy.deepcopy(original).to(runtime.torch_device).eval() if cfg.kd else None
    neurons = NeuronPerturbation(masks, cfg.neuron_eps, cfg.neuron_steps,
                                 runtime.generator(606, device=runtime.device), cfg.neuron_bias) if cfg.neuron > 0 else None
    hooks = Hooks(
        transform=transform,
        loss=make_loss(cfg, teacher, transform, neurons),
        penalty=lambda: l1_weight * masks.l1_to_one(),
        after_step=after_step,
        evaluate=monitor and (lambda step: monitor(model)),
        eval_every=cfg.eval_every if monitor else 0,
    )
    t0 = time.perf_counter()
    stopped = None
    history: list[dict] = []
    if monitor:
        history.append({"step": 0, **monitor(model)})
    try:
        history += train(model, clean.x, clean.y, opt, runtime, cfg.steps, cfg.batch_size, _scheduler(opt, cfg),
                         hooks, replacement=True, train_mode=cfg.train_mode, desc="nft", log_every=cfg.log_every,
                         generator_offset=404)
    except NonFiniteLoss as e:
        _restore(masks, model, good)
        stopped = f"stopped early: {e}; kept the last good masks"
    reset = cfg.mask_reset > 0 and stopped is None
    if reset:
        masks.reset_above_(cfg.mask_reset)
    checks = []
    if cfg.bn_recal > 0 and stopped is None:
        trained = _buffers(model)
        reestimate_bn(original, model, clean, cfg, runtime, (transform.adv, transform.wide))
        reference = copy.deepcopy(original).to(runtime.torch_device).eval() if cfg.recover_gap > 0 else None
        best = None  # (gap, (masks, buffers)) of the best-checked round: a round that reads the copies worse is undone
        while reference is not None and stopped is None:
            checks.append(clean_gap(reference, model, clean, cfg.recover_n, runtime))
            if best is None or checks[-1]["gap"] < best[0]:
                best = (checks[-1]["gap"], (masks.state_dict(), _buffers(model)))
            if checks[-1]["gap"] <= cfg.recover_gap or len(checks) > cfg.recover_rounds:
                break
            _restore(masks, model, (None, trained))  # the training-time statistics; recover longer, BN step again
            start = cfg.steps + (len(checks) - 1) * cfg.recover_steps
            for group in opt.param_groups:
                group["lr"] = cfg.recover_lr
            try:
                history += [{**h, "step": h["step"] + start} for h in
                            train(model, clean.x, clean.y, opt, runtime, cfg.recover_steps, cfg.batch_size, None,
                                  _shifted(hooks, start), replacement=True, train_mode=cfg.train_mode, desc="nft+",
                                  log_every=cfg.log_every, generator_offset=404 + len(checks))]
            except NonFiniteLoss as e:
                _restore(masks, model, good)
                stopped = f"stopped early in recovery round {len(checks)}: {e}; kept the last good masks"
            trained = _buffers(model)
            reestimate_bn(original, model, clean, cfg, runtime, (transform.adv, transform.wide))
        if best is not None and best[0] < checks[-1]["gap"]:
            _restore(masks, model, best[1])
    model.eval()
    mask_state = masks.state_dict()
    extras = {"seconds": time.perf_counter() - t0, "mask_layout": masks.layout(), "num_masks": masks.numel,
              "masks_below_0.5": int((masks.values() < 0.5).sum()), "masks_reset": reset, "config": asdict(cfg),
              "stopped": stopped, **({"recovery_checks": checks} if checks else {}),
              **({"composite_probe": probe} if probe is not None else {}),
              **({"patch_probe": patches} if patches is not None else {}),
              **({"target_probe": targeted} if targeted is not None else {}),
              **({"search_target": transform.adv.target} if getattr(transform.adv, "target", None) is not None else {}),
              "mask_state": mask_state}
    masks.fold()
    return model, masks, history, extras
