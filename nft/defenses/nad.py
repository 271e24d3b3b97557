"""NAD: Neural Attention Distillation (Li et al., ICLR 2021); BackdoorBench ``defense/nad.py`` and
the official bboylyg/NAD.

1. Teacher: fine-tune a copy of the backdoored model on the clean set (as FT) for ``te_epochs``.
2. Student: from the backdoored model, minimise CE + sum_i beta_i * MSE(A(F_i^s), A(F_i^t)) with the
   teacher frozen, where A(F) = sum_c |F_c|^p over channels, flattened and L2-normalised.

Which feature maps: for any architecture, the output of the last module at each of the last three
spatial resolutions of the network (found with one probe forward), i.e. layer2/3/4 of a ResNet.
BackdoorBench's third map is the 1x1 avgpool output, whose normalised attention is constant (its
term is always 0); the spec says to use layer2, layer3, layer4 instead.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import fine_tune, prepare


@dataclass
class NADConfig:
    te_epochs: float = 10  # BB: teacher fine-tuning epochs (epochs over the clean set; step rule, common.py)
    epochs: float = 10  # BB: the student also trains te_epochs
    betas: tuple = (500.0, 1000.0, 1000.0)  # BB betas, on the last three resolutions (layer2, 3, 4)
    p: float = 2.0  # BB and official: attention power
    batch_size: int = 256  # BB shared setting (official: 64)
    lr: float = 0.01  # BB; official per-epoch override: epochs 0-1 lr, up to 19 -> 0.01, later 1e-4
    momentum: float = 0.9  # BB
    weight_decay: float = 5e-4  # BB (official 1e-4)
    steps: int | None = None  # student steps (and teacher steps), instead of the step rule
    augment: str | None = None  # None: the clean set's standard augmentation


def attention_layers(model: nn.Module, x: torch.Tensor, k: int = 3) -> list[str]:
    """Names of the modules whose outputs are the attention maps: at each spatial resolution (4-D
    outputs with H*W > 1, of modules with parameters), the outermost module (fewest dots in its name) that finishes last; the
    last ``k`` resolutions. Found with one eval-mode forward of ``x``."""
    seen: list[tuple[str, tuple]] = []
    hooks = []
    for name, m in model.named_modules():
        if name and any(True for _ in m.parameters()):  # skip input normalisation, activations, pooling
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: seen.append((name, tuple(o.shape[2:])))
                if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[2] * o.shape[3] > 1 else None))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    depth = {res: min(n.count(".") for n, r in seen if r == res) for _, res in seen}
    chosen: dict[tuple, tuple[int, str]] = {}
    for i, (name, res) in enumerate(seen):  # the outermost module at each resolution, the last to finish
        if name.count(".") == depth[res]:
            chosen[res] = (i, name)
    return [name for _, name in sorted(chosen.values())][-k:]


def attention(f: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


class FeatureTap:
    """Keeps the latest outputs of named modules."""

    def __init__(self, model: nn.Module, names: list[str]):
        mods = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: self.out.__setitem__(n, o)) for n in names]
        self.names = names

    def maps(self) -> list[torch.Tensor]:
        return [self.out[n] for n in self.names]

    def close(self):
        for h in self.handles:
            h.remove()


def nad_lr(cfg: NADConfig, steps_per_epoch: float):
    """The official per-epoch override as a multiplier of cfg.lr."""
    def f(step):
        epoch = step / max(1e-9, steps_per_epoch)
        lr = cfg.lr if epoch < 2 else 0.01 if epoch < 20 else 1e-4
        return lr / cfg.lr
    return f


@DEFENSES.register("nad")
def defend_nad(model, clean, cfg: NADConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, NADConfig) else config_with(NADConfig, cfg or {})
    student, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    common = dict(batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                  steps=cfg.steps, augment=cfg.augment)
    teacher = copy.deepcopy(student)
    history = [{"phase": "teacher", **h} for h in
               fine_tune(teacher, clean, runtime, epochs=cfg.te_epochs, desc="nad-teacher", offset=1, **common)]
    teacher.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    names = attention_layers(student, clean.x[: min(len(clean), 8)].to(runtime.torch_device))
    betas = list(cfg.betas)[-len(names):] if names else []  # no spatial map (a ViT's tokens): plain CE
    t_tap, s_tap = FeatureTap(teacher, names), FeatureTap(student, names)

    def loss(m, x, y, step):
        logits = m(x)
        with torch.no_grad():
            teacher(x)
        at = sum(b * (attention(fs, cfg.p) - attention(ft, cfg.p)).pow(2).mean()
                 for b, fs, ft in zip(betas, s_tap.maps(), t_tap.maps()))
        return F.cross_entropy(logits, y) + at

    spe = len(clean) / min(cfg.batch_size, len(clean))
    try:
        history += [{"phase": "student", **h} for h in
                    fine_tune(student, clean, runtime, epochs=cfg.epochs, loss=loss, lr_lambda=nad_lr(cfg, spe),
                              monitor=monitor, desc="nad-student", offset=2, **common)]
    finally:
        t_tap.close()
        s_tap.close()
    student.eval()
    extras = {"seconds": time.perf_counter() - t0, "config": asdict(cfg), "attention_layers": names}
    return DefenseResult(student, history, extras)
