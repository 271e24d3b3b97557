"""FT-SAM: fine-tuning with (adaptive) sharpness-aware minimisation (Zhu et al., ICCV 2023),
as in BackdoorBench ``defense/ft-sam.py``.

Each step: the gradient g at w; the ascent e = rho * T^2 g / ||T g|| with T = |w| (ASAM; plain
SAM when ``adaptive`` is off, T = 1); the gradient at w + e (BatchNorm running statistics frozen
for that pass); the base SGD step at w with that gradient. Label-smoothed CE throughout.

The two-pass gradient is computed inside the engine's loss hook and handed to the one training
loop as a surrogate (common.surrogate), so the optimizer, schedule and logging are the engine's.
Deviation: BackdoorBench steps CosineAnnealingLR(T_max=100) once per *batch*, so its lr
oscillates with a period of 200 steps; here the cosine runs once over the whole fine-tuning.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import fine_tune, frozen_bn_stats, prepare, surrogate


@dataclass
class FTSAMConfig:
    rho: float = 2.0  # BB: rho_max = rho_min = 2.0
    adaptive: bool = True  # BB: ASAM (the --adaptive flag is store_false, so it is on)
    label_smoothing: float = 0.1  # BB
    epochs: float = 100  # BB (epochs over the clean set; step rule, common.py)
    batch_size: int = 256  # BB shared setting
    lr: float = 0.01  # BB
    momentum: float = 0.9  # BB
    weight_decay: float = 5e-4  # BB
    steps: int | None = None  # set the step count directly instead of the step rule
    augment: str | None = None  # None: the clean set's standard augmentation


def sam_loss(cfg: FTSAMConfig):
    def loss(model, x, y, step):
        params = [p for p in model.parameters() if p.requires_grad]
        first = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        grads = torch.autograd.grad(first, params, allow_unused=True)
        with torch.no_grad():
            scaled = [(p.abs() * g if cfg.adaptive else g) if g is not None else None for p, g in zip(params, grads)]
            norm = torch.norm(torch.stack([s.norm(2) for s in scaled if s is not None]), 2) + 1e-12
            eps = [((p.pow(2) if cfg.adaptive else 1.0) * g * (cfg.rho / norm)) if g is not None else None
                   for p, g in zip(params, grads)]
            for p, e in zip(params, eps):
                if e is not None:
                    p.add_(e)
        try:
            with frozen_bn_stats(model):
                second = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            sharp = torch.autograd.grad(second, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, e in zip(params, eps):
                    if e is not None:
                        p.sub_(e)
        return surrogate(first, params, sharp)

    return loss


@DEFENSES.register("ftsam")
def defend_ftsam(model, clean, cfg: FTSAMConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, FTSAMConfig) else config_with(FTSAMConfig, cfg or {})
    model, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    history = fine_tune(model, clean, runtime, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, steps=cfg.steps, augment=cfg.augment,
                        loss=sam_loss(cfg), monitor=monitor, desc="ftsam")
    model.eval()
    return DefenseResult(model, history, {"seconds": time.perf_counter() - t0, "config": asdict(cfg)})
