"""NFT's settings: ``NFTConfig`` (every field, with what it does), the named recipes and their checks.

``nft.purify`` runs them; this module only says what they are (and re-exported there, where they lived).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .errors import NFTError


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
    wide_corners: bool = False  # wide_norm 'patch' and patch_probe: one more window, the four corner windows at once (one
    # pattern across them, index wide_grid^2; CLB's trigger is in every corner and no single window fires it)
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
    recover_target_keep: float = 1.0  # during recovery (after adv_until), the share of the clean images of the search's
    # target class that stay in a batch (the patch search's class when the patch probe flagged one, else the class the
    # input search sent most perturbed images to): recovery on the target class's own images can reopen a clean-label
    # trigger (SIG, CLB), whose features live in that class; 1 = all of them (off)
    recover_target_gap: float = -1.0  # >= 0: recover_target_keep waits while the masked model (eval mode) is more than
    # this many points below the original on the clean set's images of that class (all of them stay until then, and
    # again whenever it falls behind): the class gets its accuracy back, then recovery stops feeding it; -1 = off
    target_probe: float = 0.0  # > 0: before training, a targeted universal search per class in an L2 ball of this RMS
    # a pixel (searches.targeted_probe) names the class recover_target_keep acts on: the one the most clean images of
    # other classes can be sent to. 0: the class the input search sent most perturbed images to (its vote)
    target_probe_steps: int = 40
    rounds: int = 1  # the steps are cut into this many equal rounds, each searching for its first adv_until (and
    # neuron_until) and recovering for the rest: a later round's search finds what an earlier recovery reopened
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
    bn_recal_adv: float = 0.0  # this share of each batch of the purified model's BN estimate carries the input
    # searches' last perturbations (the universal one and, with `wide`, the wide one: a share each), as the
    # training batches did; the original's estimate ('delta') stays plain (benchmarks/NOTES.md §32)
    mask_reset: float = 0.0  # after training, masks above this value go back to 1: only the channels NFT
    # closed stay closed, the small moves everywhere else (clean-set overfitting) are undone; needs bn_recal
    recover_gap: float = 0.0  # after the BN step, if the original model reads recover_n random affine copies of the
    # clean images more than this many points better than the purified one (nft.recovery.clean_gap: clean accuracy
    # the searches took and recovery did not give back), recover_steps more recovery steps at recover_lr and the BN
    # step again, up to recover_rounds times; 0 = off (no check, the run is bit for bit the run without it)
    recover_n: int = 500
    recover_steps: int = 100
    recover_lr: float = 0.03
    recover_rounds: int = 2
    oneshot_upto: float | None = None  # one-shot mode: with at most this many clean images per class
    # (None: never) ...
    oneshot: dict = field(default_factory=dict)  # ... these settings override the recipe's (not those the caller of
    # ``recipe`` gives: ``recipe("default", steps=100)`` runs 100 steps in one-shot mode too)
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
    # the pair), half a batch more are those composites labelled half each class (a quarter until session 19), and the masks
    # are per weight (Adam): CBA 82.1 -> 2.7 % ASR on the dev half; on the 17 other models the probe flags
    # nothing and the run is bit for bit the run without it (NOTES.md §16). Then a patch probe: if one window of a
    # 3x3 lattice of quarter-side squares (or the four corner squares at once) holds a pattern that sends >= 99 % of
    # the clean images to one class, half a batch more carry a patch searched in that window, pushed away from that
    # class: TrojanNN's optimised square and CLB's four corners are large in norm and small in area, beyond the
    # 0.15 ball (NOTES.md §18, §19); nothing flagged = bit for bit the run without it. One-shot mode runs it too
    # since session 16 (§20: on the dev half CLB 28.3 -> 10.6 and TrojanNN 12.7 -> 8.2 % ASR with ten images, for
    # 0.3 points of ACC on the five models it flags; §18 had left it off there on BadNets' ACC alone). With one image
    # per class a flagged pair's composites are all cut from the same two images, and a quarter of a batch of them
    # left CBA at 34-38 % on the dev half; one-shot mode took half a batch (CBA s1 / s2 -> 17 / 17, §21), and since
    # session 19 every clean-set size does: at 50 per class a quarter left CBA s1 / s2 at 22.3 / 7.1 % on the dev half,
    # half a batch 7.1 / 1.8, for 0.6-0.9 points of ACC on the CBA models (§23). One-shot
    # mode then checks the result (nft.recovery.clean_gap): if the original reads random affine copies of the ten images
    # more than a point better than the purified model, 100 more recovery steps, up to twice, keeping the round that
    # reads them best; a model that passes is bit for bit the run without the check (§22: LIRA s2 -11.8 -> -6.1,
    # BadNets s2 -4.9 -> -2.4 points of ACC on the dev half). Since session 20 one-shot mode also searches at half the
    # mask lr (0.025, eta_min 0.01) for 150 of 250 steps (the same search at half the pace, then 100 steps of recovery):
    # with ten images the full-pace search closed channels the digits need; on 18 dev-half cells -2.61 -> -1.88 points
    # of ACC, ASR 3.63 -> 3.38, LF s0 2.1 -> 12.5 (§24). With per-weight masks (a flagged composite pair) the check
    # runs but adds no round (session 27, §31): those masks fit the ten images' affine copies, so the check improves
    # while test accuracy falls (CBA 1/class, dev half: -4.71 -> -11.72; held-out seed 3: 94.7 -> 86.2 in two rounds).
    "default": {"where": "auto", "adv": 0.5, "adv_until": 0.5, "adv_after": 0.0625, "steps": 200, "batch_size": 64,
                "neuron": 0.5, "neuron_until": 0.5,
                "composites": 0.5,
                "composite_found": {"where": "weight", "optimizer": "adam", "lr": 0.01, "recover_rounds": 0},
                "patch_probe": 0.99, "wide_corners": True, "patch_found": {"wide": 0.5},
                "l1": 2e-5, "l1_per_class": False, "bn_recal": 50, "bn_recal_mode": "delta",
                "oneshot_upto": 1, "oneshot": {"adv_after": 0.125, "recover_gap": 1.0, "lr": 0.025, "eta_min": 0.01,
                                                 "steps": 250, "adv_until": 0.6, "neuron_until": 0.6}},
}


def recipe(name: str = "default", **overrides) -> NFTConfig:
    if name not in RECIPES:
        raise NFTError(f"unknown NFT recipe {name!r}; choices: {sorted(RECIPES)}")
    unknown = set(overrides) - set(NFTConfig.field_names())
    if unknown:
        raise NFTError(f"unknown NFT setting(s) {sorted(unknown)}")
    cfg = replace(NFTConfig(), recipe=name, **RECIPES[name])
    given = {k: v for k, v in overrides.items() if v is not None}
    if "oneshot" not in given:  # a setting the caller gives wins over one-shot mode's value for it
        given["oneshot"] = {k: v for k, v in cfg.oneshot.items() if k not in given}
    return validate(replace(cfg, **given))


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
        (0 <= cfg.recover_target_keep <= 1 and (cfg.recover_target_keep == 1 or (
            cfg.adv > 0 and cfg.adv_mode == "universal" and not cfg.adv_free)),
         "recover_target_keep must be in [0, 1]; below 1 it needs the universal input search (adv > 0, "
         "adv_mode='universal', adv_free off)"),
        (cfg.recover_target_gap == -1 or (0 <= cfg.recover_target_gap <= 100 and cfg.recover_target_keep < 1),
         "recover_target_gap must be -1 (off) or in [0, 100], and needs recover_target_keep < 1"),
        (cfg.target_probe >= 0 and cfg.target_probe_steps >= 1, "target_probe >= 0 and target_probe_steps >= 1"),
        (cfg.rounds >= 1 and (cfg.rounds == 1 or cfg.hold_below == 0), "rounds must be >= 1 (1 with hold_below)"),
        (cfg.adv_mode in ("universal", "image"), "adv_mode must be 'universal' or 'image'"),
        (cfg.adv_norm in ("l2", "l1") and (cfg.adv_norm == "l2" or cfg.adv_mode == "universal"),
         "adv_norm must be 'l2' or 'l1' (l1 needs adv_mode='universal')"),
        (cfg.adv_loss in ("ce", "away"), "adv_loss must be 'ce' or 'away'"),
        (0 <= cfg.wide <= 1 and cfg.wide_eps >= 0 and (cfg.wide == 0 or cfg.adv_loss == "ce"),
         "wide must be in [0, 1], wide_eps >= 0, and wide needs adv_loss='ce' (its own images take the 'away' loss)"),
        (cfg.wide_bn in ("batch", "eval"), "wide_bn must be 'batch' or 'eval'"),
        (cfg.wide_norm in ("l2", "patch") and 0 < cfg.wide_side <= 1 and cfg.wide_grid >= 1 and cfg.wide_step >= 0
         and -1 <= cfg.wide_window < cfg.wide_grid ** 2 + (cfg.wide_corners and cfg.wide_grid > 1)
         and cfg.wide_target >= -1,
         "wide_norm must be 'l2' or 'patch', wide_side in (0, 1], wide_grid >= 1, wide_step >= 0, wide_window in "
         "[-1, wide_grid^2) (wide_grid^2 too with wide_corners), wide_target >= -1"),
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
        (cfg.recover_gap >= 0 and cfg.recover_n >= 1 and cfg.recover_steps >= 1 and cfg.recover_lr >= 0
         and cfg.recover_rounds >= 0 and (cfg.recover_gap == 0 or cfg.bn_recal > 0),
         "recover_gap >= 0 (needs bn_recal > 0), recover_n and recover_steps >= 1, recover_lr and recover_rounds >= 0"),
        (0 <= cfg.bn_recal_adv < 1 and (cfg.bn_recal_adv == 0 or (cfg.bn_recal > 0 and cfg.adv > 0)),
         "bn_recal_adv must be in [0, 1) and needs bn_recal > 0 and adv > 0"),
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
    for name, where, on in (("composite_found", "with composite_found={}", cfg.composites > 0),
                            ("patch_found", "with patch_found={}; patch_probe=0 turns it off", cfg.patch_probe > 0),
                            ("oneshot", "in one-shot mode, with oneshot={}; set oneshot={{}} to turn it off", True)):
        value = getattr(cfg, name)
        if value and on:  # settings a probe applies are checked only while the probe is on
            try:
                validate(replace(cfg, **{name: {}}, **value))
            except NFTError as e:
                raise NFTError(f"{e} ({where.format(value)})") from None
    return cfg


_OVERRIDES = {"oneshot": {"recipe", "oneshot", "oneshot_upto"},
              "composite_found": {"recipe", "oneshot", "oneshot_upto", "composite_found"},
              "patch_found": {"recipe", "oneshot", "oneshot_upto", "patch_found", "patch_probe"}}


def searching(cfg: NFTConfig, step: int, until: float) -> bool:
    """Whether optimizer step ``step`` (1-based) is in the search part of its round: the first ``until`` of each of
    ``cfg.rounds`` equal rounds of ``cfg.steps`` (with one round, ``step <= until * steps``). Steps past
    ``cfg.steps`` (the recovery check's extra rounds) never are."""
    if step > cfg.steps:
        return False
    length = cfg.steps / cfg.rounds
    return (step - 1) % length + 1 <= until * length


def for_clean_set(cfg: NFTConfig, per_class: float) -> NFTConfig:
    """``cfg`` as it runs on a clean set of ``per_class`` images per class: one-shot mode's overrides
    apply when ``per_class <= cfg.oneshot_upto``."""
    if cfg.oneshot and cfg.oneshot_upto is not None and per_class <= cfg.oneshot_upto:
        return replace(cfg, **cfg.oneshot)
    return cfg
