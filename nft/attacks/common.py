"""Pieces shared by the attacks: on-the-fly (per-batch) poisoning, small generator nets, module
state in flat safetensors-ready dicts, and a quickly trained clean surrogate model.

Attacks that train jointly with the victim (Input-aware, LIRA, WaNet noise mode, BPP negatives)
subclass ``OnTheFlyAttack``: ``poison_train`` leaves the data alone and remembers the rate, and
``train_hooks`` poisons the first ~rate*B samples of every batch inside the shared engine.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import Hooks
from ..errors import NFTError
from .base import Attack


# -- module state <-> flat tensor dicts -------------------------------------------------------------
def module_state(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def load_module_state(prefix: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise NFTError(f"attack artifact does not fit its {prefix!r} network: {str(e).splitlines()[0]}") from None


def sync_grads(params) -> None:
    """Average the gradients of an attack's own network across DDP ranks (no-op without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    ws = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= ws


# -- per-batch poisoning ----------------------------------------------------------------------------
def batch_count(rate: float, n: int, g: torch.Generator | None = None) -> int:
    """round(rate * n); when rate * n < 1, one sample with probability rate * n (BackdoorBench's
    ``generalize_to_lower_pratio``)."""
    k = rate * n
    if k >= 1:
        return min(n, int(round(k)))
    return int(torch.rand((), generator=g) < k) if k > 0 else 0


class OnTheFlyAttack(Attack):
    """Poison inside the training loop: the first k = rate*B samples of a batch are triggered and
    relabelled, the next ``neg_ratio`` * k are negative ("cross"/"noise") samples that keep their
    labels. Subclasses give ``trigger`` and, if they have them, ``negative`` and ``_hooks``."""

    neg_ratio = 0.0

    def __init__(self, **kw):
        super().__init__(**kw)
        self.train_rate = 0.0

    def poison_train(self, images, labels, rate, rng):
        if not 0 <= rate <= 1:
            raise NFTError(f"poison rate must be in [0, 1], got {rate}")
        self.train_rate = rate
        return images, labels, torch.empty(0, dtype=torch.long)

    def train_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger inside training (generator attacks keep the graph here; ``trigger`` does not)."""
        return self.trigger(x)

    def negative(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator, rate: float | None = None):
        """(x, y, k, n_neg): the batch with its first k samples poisoned and the next n_neg negatives."""
        rate = self.train_rate if rate is None else rate
        k = batch_count(rate, len(x), g)
        n_neg = min(len(x) - k, int(round(self.neg_ratio * k))) if k else 0
        if k == 0:
            return x, y, 0, 0
        xp = self.train_trigger(x[:k]).clamp(0, 1)
        parts = [xp]
        if n_neg:
            parts.append(self.negative(x[k:k + n_neg], g).clamp(0, 1))
        x = torch.cat(parts + [x[k + n_neg:]])
        y = torch.cat([self.backdoor_labels(y[:k]), y[k:]])
        return x, y, k, n_neg

    def train_hooks(self, runtime):
        g = runtime.generator(303)
        extra = self._hooks(runtime)

        def transform(x, y, step):
            x, y, _, _ = self.poison_batch(x, y, g)
            return x, y

        return Hooks(transform=transform, loss=extra.loss, after_step=extra.after_step)

    def _hooks(self, runtime) -> Hooks:
        return Hooks()


# -- small nets -------------------------------------------------------------------------------------
def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small encoder-decoder with skip connections for any image size: ``len(widths)`` down steps
    (2 conv blocks + maxpool), a middle block, then bilinear upsampling back to each skip's size.
    Output is raw (the caller squashes it)."""

    def __init__(self, cin: int, cout: int, widths=(16, 32), skips: bool = True):
        super().__init__()
        self.skips = skips
        self.down = nn.ModuleList()
        c = cin
        for w in widths:
            self.down.append(nn.Sequential(conv_block(c, w), conv_block(w, w)))
            c = w
        self.mid = conv_block(c, c)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(nn.Sequential(conv_block(c + (w if skips else 0), w), conv_block(w, w)))
            c = w
        self.out = nn.Conv2d(c, cout, 1)

    def forward(self, x):
        saved = []
        for d in self.down:
            x = d(x)
            saved.append(x)
            x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.mid(x)
        for u in self.up:
            s = saved.pop()
            x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = u(torch.cat([x, s], 1) if self.skips else x)
        return self.out(x)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


# -- a clean surrogate model (label-consistent PGD, low-frequency UAP, TrojanNN neuron selection) ---
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, g: torch.Generator | None = None,
        step_size: float | None = None) -> torch.Tensor:
    """Untargeted PGD-L_inf with a random start (Madry et al.): float images in [0, 1] -> adversarial
    images within ``eps`` of x. Step 2.5 * eps / steps unless given. The model's mode is left alone."""
    step_size = 2.5 * eps / max(1, steps) if step_size is None else step_size
    delta = ((torch.rand(x.shape, generator=g) * 2 - 1) * eps).to(x.device)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def train_surrogate(data, runtime, arch: str = "smallcnn", epochs: float = 2, width: int = 16, lr: float = 0.05,
                    adv_eps: float = 0.0, adv_steps: int = 5):
    """Train a small clean model on ``data.train`` through the shared engine; returned in eval mode.
    ``adv_eps`` > 0 trains it adversarially (Madry et al.: every batch replaced by its PGD-L_inf
    examples, ``adv_steps`` steps, against the model in eval mode), which makes a robust model."""
    from ..augment import train_transform
    from ..engine import steps_for, train
    from ..models import build_model

    model = build_model(arch, data.num_classes, data.input_shape[0], data.mean, data.std,
                        width=width).to(runtime.torch_device)
    aug, g = train_transform(data.augment), runtime.generator(404)
    gp = torch.Generator().manual_seed(runtime.seed * 31 + 409)
    steps = steps_for(len(data.train), 128, epochs)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)

    def transform(x, y, step):
        x = aug(x, g)
        if adv_eps > 0:
            model.eval()
            x = pgd(model, x, y, adv_eps, adv_steps, gp)
            model.train()
        return x, y

    train(model, data.train.x, data.train.y, opt, runtime.__class__(
        device=runtime.device, seed=runtime.seed, progress=False, rank=0, world_size=1),
        steps, 128, sched, Hooks(transform=transform), desc="surrogate", generator_offset=405)
    return model.eval()


def check_fitted(attack: Attack, what: str) -> None:
    if not getattr(attack, "fitted", False):
        raise NFTError(f"{attack.name} has no {what}: call fit(data, runtime) or load its attack.safetensors")
