"""FT: vanilla fine-tuning of all weights on the clean set (BackdoorBench ``defense/ft.py``)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import fine_tune, prepare


@dataclass
class FTConfig:
    epochs: float = 100  # BB config/defense/ft/cifar10.yaml; epochs over the clean set (step rule, common.py)
    batch_size: int = 256  # BB shared setting
    lr: float = 0.01  # BB: SGD lr 0.01
    momentum: float = 0.9  # BB
    weight_decay: float = 5e-4  # BB
    steps: int | None = None  # set the step count directly instead of the step rule
    augment: str | None = None  # None: the clean set's standard augmentation (BB: crop + flip)


@DEFENSES.register("ft")
def defend_ft(model, clean, cfg: FTConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    """Minimise CE over all weights, SGD + per-step cosine (BB: CosineAnnealingLR, T_max = epochs)."""
    cfg = cfg if isinstance(cfg, FTConfig) else config_with(FTConfig, cfg or {})
    model, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    history = fine_tune(model, clean, runtime, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, steps=cfg.steps, augment=cfg.augment,
                        monitor=monitor, desc="ft")
    model.eval()
    return DefenseResult(model, history, {"seconds": time.perf_counter() - t0, "config": asdict(cfg)})
