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
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn

from . import augment as A
from .bn import recalibrate_bn, reestimate_bn, transfer_bn_delta  # noqa: F401 (their home was here)
from .data.core import CleanSet
from .engine import Hooks, NonFiniteLoss, cosine_schedule, train
from .errors import NFTError
from .masks import Masks, attach, clip_schedule
from .runtime import Runtime
from .searches import (ImagePerturbation, NeuronPerturbation, PatchPerturbation, SparsePerturbation, UniversalPerturbation,
                       composite_probe, patch_probe)


@dataclass
class NFTConfig:
    recipe: str = "default"
    where: str = "norm"  # mask placement: 'norm' (BN/GN/LN weights, the seed), 'auto' (+ conv/linear outputs) or
    # 'weight' (+ one mask per conv/linear weight, AWM's granularity; nft.masks)
    clip_alpha: float = 0.8  # lower bound of layer l is clip_alpha * exp(-clip_beta * l) (seed schedule)
    clip_beta: float = 0.5
    l1: float = 1e-3  # weight of ||1 - m||_1
    l1_per_class: bool = True  # divide the L1 weight by N_c (clean samples per class), as the seed does
    mixup_alpha: float = 1.0  # MixUp Beta(a, a); 1 = uniform lam
    cutmix: float = 0.0  # probability per batch of CutMix (a pasted box, same Beta) instead of MixUp
    hold_below: float = 0.0  # from the end of the search (adv_until) on, masks <= this stay where they are
    adv_mode: str = "universal"  # 'universal': one delta for all images; 'image': a PGD delta per image
    adv_starts: int = 1  # adv_mode 'universal': independent deltas (random starts); image i carries delta i mod this
    adv_image_steps: int = 3  # adv_mode 'image': PGD steps per batch (L2 ball of adv_eps, random start)
    patches: float = 0.0  # probability per image of a random noise patch (0 = off; see augment.random_patches)
    patch_size: tuple = (0.07, 0.25)  # patch side as a fraction of the image side (min, max)
    adv: float = 0.0  # extra images per batch (fraction of it) carrying a universal adversarial perturbation
    adv_eps: float = 0.15  # L2 radius of that perturbation, as an RMS per pixel (radius = eps * sqrt(C*H*W))
    adv_norm: str = "l2"  # 'l2', or 'l1': an L1 ball of radius adv_eps * C*H*W (adv_eps = mean |delta| per
    # pixel; steps move the top-gradient pixels by adv_step), where a saturated patch fits (searches.SparsePerturbation)
    adv_step: float = 0.25  # ascent step, as a fraction of the radius (one normalised-gradient step per mask step)
    adv_until: float = 1.0  # fraction of the steps that use the perturbation; the rest only MixUp (recovery)
    adv_after: float = 0.0  # during recovery, this fraction of a batch still carries the perturbation (relapse
    # guard, benchmarks/NOTES.md §5); adv_frozen: frozen where the search left it, else the search goes on
    adv_frozen: bool = False
    adv_loss: str = "ce"  # on the perturbed images: 'ce', cross-entropy to their true labels; 'away', only
    # -log(1 - p_t) for t the class the perturbation sends most of them to (not the classes of the images the
    # perturbation leaves alone): the masks must stop the push to t, not read the true digit through a large delta
    wide: float = 0.0  # extra images per batch (fraction of it) carrying a second universal perturbation, in a wider
    # L2 ball (wide_eps) and always with the 'away' loss, beside the first one (which keeps its own loss): a trigger
    # of larger norm than adv_eps (a saturated patch) is reached without teaching the masks to read the true digit
    # through a large delta; in recovery adv_after of a batch still carries it; 0 = off
    wide_eps: float = 0.25
    wide_norm: str = "l2"  # the second search's shape: 'l2', one delta in an L2 ball of wide_eps; 'patch', universal
    # patches (searches.PatchPerturbation): one delta per window of a wide_grid x wide_grid lattice of squares of side
    # wide_side (a fraction of the image side), any value inside, signed steps of wide_step
    wide_side: float = 0.25
    wide_grid: int = 3
    wide_step: float = 0.1
    wide_window: int = -1  # wide_norm 'patch': only this window of the lattice (row-major; -1 = all of them)
    wide_target: int = -1  # the class the wide rows' away loss pushes down (-1: the one most of them are predicted as)
    wide_flipped: bool = False  # the away loss only on the wide rows the perturbation currently sends to t (none
    # once the masks have stopped the push), not on every row until p_t is 0
    wide_bn: str = "batch"  # the wide rows go through BatchNorm with the batch's statistics ('batch', in the same
    # forward pass as the others) or with the running ones ('eval', a pass of their own: the batch statistics, and so
    # the running ones, stay those of the clean and first-search rows)
    adv_free: bool = False  # take the perturbation's ascent step from the mask step's own backward pass (the
    # gradient of the training loss on the perturbed images, "free" adversarial training, Shafahi et al. 2019)
    # instead of a separate forward/backward in eval mode: the same search for about a fifth less time
    neuron: float = 0.0  # weight w of the neuron-perturbation loss: (1 - w) CE(masked) + w CE(masked, every mask
    # m -> m (1 + d), d in [-neuron_eps, neuron_eps] pushed up the loss): a trigger search in neuron space (as ANP's),
    # which needs no input trigger of any shape; 0 = off
    neuron_eps: float = 0.4  # the relative bound of d (ANP's eps)
    neuron_bias: bool = True  # also scale norm layers' biases, b -> b (1 + e), |e| <= neuron_eps (ANP does)
    neuron_steps: int = 1  # signed-gradient ascent steps on d per batch, from a uniform random start (ANP: 1)
    neuron_until: float = 1.0  # fraction of the steps that use it
    neuron_after: float = 0.0  # its weight after neuron_until (a neuron-space relapse guard during recovery)
    neuron_part: str = "all"  # images of the batch the perturbed loss sees: 'all', or 'adv' (only those carrying
    # the input perturbation: about a third of the extra cost; every image when a batch has none)
    composites: float = 0.0  # extra images per batch (fraction of it): half-and-half composites of two clean images
    # of a pair of classes that searches.composite_probe (run first; 0 = off) finds the model reads as a third class
    # (a composite backdoor, CBA), labelled half one class and half the other; none found = nothing changes
    composite_share: float = 0.7  # the probe flags a pair when this share of its composites go to one third class
    composite_index: float = 2.0  # ... and when that share is an outlier among the pairs' (anomaly index, as Neural Cleanse's)
    composite_k: int = 64  # composites the probe makes per pair
    composite_found: dict = field(default_factory=dict)  # settings that apply when the probe flags a pair
    patch_probe: float = 0.0  # run searches.patch_probe first (0 = off): a window of the wide_grid lattice whose universal
    # patch sends at least this share of the clean images to one class is flagged (a patch trigger); then the wide
    # search is a patch search in the flagged windows (wide_window), its away loss on that class (wide_target), with
    # the patch_found settings; none flagged = nothing changes
    patch_probe_steps: int = 40  # signed steps of the probe's search per window
    patch_probe_median: float = 0.7  # ... and only while the median window's share is at most this: a weak model that
    # sends the clean images to one class from every window (the tests' 3-epoch CNN: 0.78-0.89) has no trigger window;
    # the mnist10k models' medians are 0.09-0.60 (benchmarks/NOTES.md §18)
    patch_found: dict = field(default_factory=dict)
    kd: float = 0.0  # weight of KL(original || masked) on the clean (MixUp) images: the original model's full
    # output on interpolated clean images says more than ten hard labels, and it is clean there
    kd_temp: float = 2.0  # softmax temperature of that term (scaled by T^2)
    lr: float = 0.05  # SGD on the masks
    optimizer: str = "sgd"  # 'sgd' (with momentum) or 'adam' (per-entry step sizes: per-weight masks, where='weight',
    # get gradients far smaller than a channel's; AWM uses Adam for them)
    momentum: float = 0.95
    steps: int = 1000  # optimizer steps; batches drawn with replacement
    batch_size: int = 128
    schedule: str = "seed"  # 'seed': cosine over 5 blocks (T_max=5, eta_min), stepped per block; 'cosine': per step
    eta_min: float = 0.02
    train_mode: bool = True  # BN re-estimates its statistics from the augmented clean batches (seed behaviour)
    bn_momentum: float | None = None  # BN running-stat momentum during NFT (None keeps the model's, 0.1)
    bn_recal: int = 0  # after training, re-estimate BN statistics from this many plain (no MixUp) clean batches
    bn_recal_mode: str = "replace"  # 'replace': use those estimates; 'delta': keep the model's own statistics
    # and move them only by what the masks changed (estimate on the same batches before and after)
    mask_reset: float = 0.0  # after training, masks above this value go back to 1: only the channels NFT
    # closed stay closed, the small moves everywhere else (clean-set overfitting) are undone; needs bn_recal
    oneshot_upto: float | None = None  # one-shot mode: with at most this many clean images per class
    # (None: never) ...
    oneshot: dict = field(default_factory=dict)  # ... these settings override the others
    augment: str | None = None  # standard augmentation; None = the clean set's own (crop/flip, or shift for digits)
    log_every: int = 10
    eval_every: int = 100  # when the runner passes a monitor

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


RECIPES: dict[str, dict] = {
    # The seed repository (spec §1): BN-weight masks, seed clip schedule, L1 0.001/N_c, MixUp 1,
    # SGD 0.05 / 0.95, cosine over 5 blocks of 200 steps, 1,000 steps of 128 drawn with replacement.
    "paper": {},
    # This project's recipe; see benchmarks/NOTES.md for the measurements behind each choice.
    # Masks also on conv outputs that feed residual adds; a universal adversarial perturbation on
    # half a batch of extra images for the first half of the steps (it finds what the backdoor
    # responds to), then mostly MixUp to recover clean accuracy; 400 steps. The L1 weight is a
    # constant 2e-5 (the seed's 0.001/N_c at 50 per class): divided by N_c = 1 it pulled the
    # backdoor channels back open in one-shot runs (NOTES.md §3). During recovery a sixteenth of
    # each batch still carries the (still searching) perturbation: without it a blended trigger came
    # back on some models (NOTES.md §5, §7). At the end the model keeps its own BN statistics, moved
    # by what the masks changed (NOTES.md §7: statistics from clean images alone let a blended
    # trigger back in). With one image per class the guard is doubled (§9).
    # 200 steps of 64 (a quarter of the compute of session 3's 400 of 128) purified as well on the dev
    # half (NOTES.md §9). One-shot mode (at most one image per class) keeps the guard at 8 images a
    # batch, as at 128 (session 5's one-shot mode also reset the masks above 0.5 to 1: with the neuron
    # search below, that reopened TrojanNN/LF backdoors on the dev half, NOTES.md §12). During the
    # search, half the loss is taken under an adversarial neuron perturbation (ANP's, eps 0.4, on masks and norm biases): the input search
    # alone missed sample-specific, low-frequency and clean-label triggers on some seeds (ISSBA,
    # LF, TrojanNN, CLB), the neuron search alone missed ISSBA and CLB too, the two together removed
    # all four on the dev half (NOTES.md §12), for about twice the time. First a composite probe: if the
    # model reads the half-and-half composites of one pair of classes as a third class (a composite backdoor,
    # CBA, which no perturbation of one image describes and channel masks could not unlearn even when told
    # the pair), a quarter of a batch more are those composites labelled half each class, and the masks
    # are per weight (Adam): CBA 82.1 -> 2.7 % ASR on the dev half; on the 17 other models the probe flags
    # nothing and the run is bit for bit the run without it (NOTES.md §16).
    "default": {"where": "auto", "adv": 0.5, "adv_until": 0.5, "adv_after": 0.0625, "steps": 200, "batch_size": 64,
                "neuron": 0.5, "neuron_until": 0.5,
                "composites": 0.25, "composite_found": {"where": "weight", "optimizer": "adam", "lr": 0.01},
                "l1": 2e-5, "l1_per_class": False, "bn_recal": 50, "bn_recal_mode": "delta",
                "oneshot_upto": 1, "oneshot": {"adv_after": 0.125}},
}


def recipe(name: str = "default", **overrides) -> NFTConfig:
    if name not in RECIPES:
        raise NFTError(f"unknown NFT recipe {name!r}; choices: {sorted(RECIPES)}")
    unknown = set(overrides) - set(NFTConfig.field_names())
    if unknown:
        raise NFTError(f"unknown NFT setting(s) {sorted(unknown)}")
    cfg = replace(NFTConfig(), recipe=name, **RECIPES[name])
    return validate(replace(cfg, **{k: v for k, v in overrides.items() if v is not None}))


def validate(cfg: NFTConfig) -> NFTConfig:
    """Reject settings that cannot run (NFTError names the first one)."""
    checks = [
        (cfg.where in ("norm", "auto", "weight"), "where must be 'norm', 'auto' or 'weight'"),
        (cfg.steps >= 1, "steps must be >= 1"),
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.lr >= 0 and cfg.eta_min >= 0, "lr and eta_min must be >= 0"),
        (0 <= cfg.momentum < 1, "momentum must be in [0, 1)"),
        (cfg.optimizer in ("sgd", "adam"), "optimizer must be 'sgd' or 'adam'"),
        (cfg.l1 >= 0, "l1 must be >= 0"),
        (cfg.mixup_alpha >= 0, "mixup_alpha must be >= 0"),
        (0 <= cfg.cutmix <= 1, "cutmix must be in [0, 1]"),
        (0 <= cfg.hold_below <= 1, "hold_below must be in [0, 1]"),
        (cfg.adv_mode in ("universal", "image"), "adv_mode must be 'universal' or 'image'"),
        (cfg.adv_norm in ("l2", "l1") and (cfg.adv_norm == "l2" or cfg.adv_mode == "universal"),
         "adv_norm must be 'l2' or 'l1' (l1 needs adv_mode='universal')"),
        (cfg.adv_loss in ("ce", "away"), "adv_loss must be 'ce' or 'away'"),
        (0 <= cfg.wide <= 1 and cfg.wide_eps >= 0 and (cfg.wide == 0 or cfg.adv_loss == "ce"),
         "wide must be in [0, 1], wide_eps >= 0, and wide needs adv_loss='ce' (its own images take the 'away' loss)"),
        (cfg.wide_bn in ("batch", "eval"), "wide_bn must be 'batch' or 'eval'"),
        (cfg.wide_norm in ("l2", "patch") and 0 < cfg.wide_side <= 1 and cfg.wide_grid >= 1 and cfg.wide_step >= 0
         and -1 <= cfg.wide_window < cfg.wide_grid ** 2 and cfg.wide_target >= -1,
         "wide_norm must be 'l2' or 'patch', wide_side in (0, 1], wide_grid >= 1, wide_step >= 0, wide_window in "
         "[-1, wide_grid^2), wide_target >= -1"),
        (cfg.adv_mode == "universal" or not (cfg.adv_free or cfg.adv_frozen),
         "adv_free and adv_frozen need adv_mode='universal'"),
        (cfg.adv_image_steps >= 1 and cfg.adv_starts >= 1, "adv_image_steps and adv_starts must be >= 1"),
        (0 <= cfg.patches <= 1 and 0 <= cfg.adv <= 1, "patches and adv must be in [0, 1]"),
        (cfg.adv_eps >= 0 and cfg.adv_step >= 0 and 0 <= cfg.adv_until <= 1, "adv_eps, adv_step >= 0, adv_until in [0, 1]"),
        (0 <= cfg.adv_after <= 1, "adv_after must be in [0, 1]"),
        (cfg.schedule in ("seed", "cosine", "constant"), "schedule must be 'seed', 'cosine' or 'constant'"),
        (cfg.kd >= 0 and cfg.kd_temp > 0, "kd >= 0 and kd_temp > 0"),
        (cfg.neuron_part in ("all", "adv"), "neuron_part must be 'all' or 'adv'"),
        (0 <= cfg.neuron <= 1 and cfg.neuron_eps >= 0 and cfg.neuron_steps >= 1 and 0 <= cfg.neuron_until <= 1,
         "neuron in [0, 1], neuron_eps >= 0, neuron_steps >= 1, neuron_until in [0, 1]"),
        (0 <= cfg.neuron_after <= 1 and (cfg.neuron_after == 0 or cfg.neuron > 0),
         "neuron_after must be in [0, 1] and needs neuron > 0"),
        (cfg.bn_recal >= 0 and cfg.bn_recal_mode in ("replace", "delta"), "bn_recal >= 0, bn_recal_mode 'replace' or 'delta'"),
        (0 <= cfg.mask_reset <= 1, "mask_reset must be in [0, 1]"),
        (cfg.mask_reset == 0 or cfg.bn_recal > 0, "mask_reset needs bn_recal > 0 (the BN statistics must follow the masks)"),
        (0 <= cfg.patch_probe <= 1 and cfg.patch_probe_steps >= 1 and 0 <= cfg.patch_probe_median <= 1,
         "patch_probe in [0, 1], patch_probe_steps >= 1, patch_probe_median in [0, 1]"),
        (0 <= cfg.composites <= 1 and 0 < cfg.composite_share <= 1 and cfg.composite_k >= 1 and cfg.composite_index >= 0,
         "composites in [0, 1], composite_share in (0, 1], composite_k >= 1, composite_index >= 0"),
    ]
    for name, forbidden in _OVERRIDES.items():  # settings that override others under a condition
        value = getattr(cfg, name)
        keys = set(value) if isinstance(value, dict) else {"?"}
        checks += [(isinstance(value, dict) and not keys & forbidden, f"{name} must be a dict of other settings"),
                   (keys <= set(NFTConfig.field_names()), f"unknown setting(s) in {name}: {sorted(keys)}")]
    for ok, msg in checks:
        if not ok:
            raise NFTError(f"invalid NFT setting: {msg}")
    for name, where in (("composite_found", "with composite_found={}"), ("patch_found", "with patch_found={}"),
                        ("oneshot", "in one-shot mode, with oneshot={}; set oneshot={{}} to turn it off")):
        value = getattr(cfg, name)
        if value:
            try:
                validate(replace(cfg, **{name: {}}, **value))
            except NFTError as e:
                raise NFTError(f"{e} ({where.format(value)})") from None
    return cfg


_OVERRIDES = {"oneshot": {"recipe", "oneshot", "oneshot_upto"},
              "composite_found": {"recipe", "oneshot", "oneshot_upto", "composite_found"},
              "patch_found": {"recipe", "oneshot", "oneshot_upto", "patch_found", "patch_probe"}}


def for_clean_set(cfg: NFTConfig, per_class: float) -> NFTConfig:
    """``cfg`` as it runs on a clean set of ``per_class`` images per class: one-shot mode's overrides
    apply when ``per_class <= cfg.oneshot_upto``."""
    if cfg.oneshot and cfg.oneshot_upto is not None and per_class <= cfg.oneshot_upto:
        return replace(cfg, **cfg.oneshot)
    return cfg


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
                   pairs: list | None = None, gc: torch.Generator | None = None):
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
                          None if cfg.wide_window < 0 else cfg.wide_window) if cfg.wide_norm == "patch"
        else UniversalPerturbation(shape, cfg.wide_eps, cfg.adv_step, g.device, g))

    def transform(x, y, step):
        transform.clean = len(x)  # the first images of the batch are clean (MixUp); the rest carry delta
        x = base(x, g)
        if cfg.patches > 0:
            x = A.random_patches(x, g, cfg.patches, *cfg.patch_size)
        mix = A.cutmix if cfg.cutmix > 0 and float(torch.rand((), generator=g, device=g.device)) < cfg.cutmix \
            else A.mixup
        xm, ym = mix(x, y, clean.num_classes, cfg.mixup_alpha, g)
        searching = step <= cfg.adv_until * cfg.steps
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
    neuron_to = cfg.neuron_until * cfg.steps

    def loss(model, x, y, step):
        w = cfg.neuron if step <= neuron_to else cfg.neuron_after
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
                              16 * cfg.wide_grid ** 2, runtime.generator(709))
        patches["flagged"] = [w for w, (share, _) in enumerate(patches["windows"]) if share >= cfg.patch_probe
                              and patches["median"] <= cfg.patch_probe_median]
        if patches["flagged"]:
            cfg = validate(replace(cfg, **{"wide_norm": "patch", "wide_window": patches["window"],
                                           "wide_target": patches["to"], **cfg.patch_found}))
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
    snapshot = lambda: (masks.state_dict(), {k: b.detach().clone() for k, b in model.named_buffers()})  # noqa: E731
    good, pending = snapshot(), None

    transform = make_transform(cfg, clean, runtime.generator(303, device=runtime.device), model,
                               probe and probe["pairs"], runtime.generator(708))

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
        masks.load_state_dict(good[0])
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(good[1][k])
        stopped = f"stopped early: {e}; kept the last good masks"
    reset = cfg.mask_reset > 0 and stopped is None
    if reset:
        masks.reset_above_(cfg.mask_reset)
    if cfg.bn_recal > 0 and stopped is None:
        reestimate_bn(original, model, clean, cfg, runtime)
    model.eval()
    mask_state = masks.state_dict()
    extras = {"seconds": time.perf_counter() - t0, "mask_layout": masks.layout(), "num_masks": masks.numel,
              "masks_below_0.5": int((masks.values() < 0.5).sum()), "masks_reset": reset, "config": asdict(cfg),
              "stopped": stopped, **({"composite_probe": probe} if probe is not None else {}),
              **({"patch_probe": patches} if patches is not None else {}),
              "mask_state": mask_state}
    masks.fold()
    return model, masks, history, extras
