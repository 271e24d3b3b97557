"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021); official csdongxian/ANP_backdoor.

Every neuron (a norm layer's affine channel; for a model without norm layers, a conv/linear output
channel) gets a mask m in [0, 1] and multiplicative noise: the layer uses weight * (m + delta) and
bias * (1 + xi) with the noise on, weight * m and bias with it off. Per step:

1. delta, xi ~ U[-eps, eps]; one signed ascent step of size eps / anp_steps on CE for both, then
   the projection back onto [-eps, eps] (the paper's constraint; the official code omits it, so its
   noise can reach 2 eps);
2. mask loss alpha * CE(noise off) + (1 - alpha) * CE(noise on); an SGD step on m; clip m to [0, 1].

Then the original model is pruned: the weight of every neuron with m <= ``threshold`` is zeroed.
The threshold is the paper's fixed 0.2, never chosen on test or poisoned data (BackdoorBench picks
the threshold with the lowest test ASR).

The mask and noise are a parametrization of this file (``NoisyScale``), attached to whatever
layers ``common.neuron_sites`` finds, so ANP runs on any model nft.masks supports.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..engine import Hooks, train
from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import augmenter, clean_tensors, epoch_steps, monitor_hooks, neuron_sites, prepare, prune_neurons


@dataclass
class ANPConfig:
    eps: float = 0.4  # official --anp-eps
    anp_steps: int = 1  # official --anp-steps: ascent steps on the noise
    alpha: float = 0.2  # official --anp-alpha: weight of the clean (noise-off) loss
    lr: float = 0.2  # official mask lr (BB: 0.01)
    momentum: float = 0.9  # official
    epochs: float = 512  # official 2,000 iterations x 128 on 500 images (step rule, common.py)
    batch_size: int = 128  # official
    threshold: float = 0.2  # the paper's fixed pruning threshold (m <= 0.2 is pruned)
    steps: int | None = None  # set the step count directly instead of the step rule
    augment: str | None = None  # None: the clean set's standard augmentation (official: crop + flip)


class NoiseState:
    on = False


class NoisyScale(nn.Module):
    """w -> w * (m + delta) with the noise on, w * m with it off (m, delta broadcast per channel)."""

    def __init__(self, mask: nn.Parameter, noise: torch.Tensor, state: NoiseState, ndim: int, full: bool):
        super().__init__()
        self.mask, self.noise, self.state = mask, noise, state
        self.shape = None if full else (-1,) + (1,) * (ndim - 1)

    def forward(self, w):
        s = self.mask + self.noise if self.state.on else self.mask
        return w * (s if self.shape is None else s.view(self.shape)).to(w.dtype)


class NoisyShift(nn.Module):
    """b -> b * (1 + xi) with the noise on, b with it off."""

    def __init__(self, noise: torch.Tensor, state: NoiseState):
        super().__init__()
        self.noise, self.state = noise, state

    def forward(self, b):
        return b * (1 + self.noise).to(b.dtype) if self.state.on else b


class NeuronNoise:
    """Masks and noise on the neurons of one model (build with :meth:`attach`)."""

    def __init__(self, model, names, masks, noises, state):
        self.model, self.names, self.masks, self.noises, self.state = model, names, masks, noises, state

    @classmethod
    def attach(cls, model: nn.Module) -> "NeuronNoise":
        state, names, masks, noises = NoiseState(), [], [], []
        for name, kind, m in neuron_sites(model):
            w = m.weight
            full = kind == "norm"
            mask = nn.Parameter(torch.ones(w.shape if full else w.shape[:1], device=w.device))
            delta = torch.zeros_like(mask, requires_grad=True)
            parametrize.register_parametrization(m, "weight", NoisyScale(mask, delta, state, w.dim(), full), unsafe=True)
            noises.append(delta)
            if getattr(m, "bias", None) is not None:
                xi = torch.zeros_like(m.bias, requires_grad=True)
                parametrize.register_parametrization(m, "bias", NoisyShift(xi, state), unsafe=True)
                noises.append(xi)
            names.append(name)
            masks.append(mask)
        return cls(model, names, masks, noises, state)

    @torch.no_grad()
    def reset(self, eps: float, g: torch.Generator) -> None:
        for t in self.noises:
            t.copy_((torch.rand(t.shape, generator=g, device=g.device).to(t.device) * 2 - 1) * eps)
            t.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().cpu().clone() for n, m in zip(self.names, self.masks)}


@DEFENSES.register("anp")
def defend_anp(model, clean, cfg: ANPConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, ANPConfig) else config_with(ANPConfig, cfg or {})
    original, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    work, _ = prepare(original, runtime)  # masks are learned on a copy; its BN statistics drift in train mode
    for p in work.parameters():
        p.requires_grad_(False)
    nn_ = NeuronNoise.attach(work)
    g = runtime.generator(501, device=runtime.device)
    step_size = cfg.eps / max(1, cfg.anp_steps)
    noise_max = []

    def loss(m, x, y, step):
        if cfg.eps > 0:
            nn_.reset(cfg.eps, g)
            nn_.state.on = True
            for _ in range(cfg.anp_steps):
                grads = torch.autograd.grad(F.cross_entropy(m(x), y), nn_.noises, allow_unused=True)
                with torch.no_grad():
                    for t, gr in zip(nn_.noises, grads):
                        if gr is not None:
                            t.add_(step_size * gr.sign()).clamp_(-cfg.eps, cfg.eps)
            noise_max.append(max(float(t.detach().abs().max()) for t in nn_.noises))
            loss_rob = F.cross_entropy(m(x), y)
        else:
            loss_rob = 0.0
        nn_.state.on = False
        return cfg.alpha * F.cross_entropy(m(x), y) + (1 - cfg.alpha) * loss_rob

    def after_step(step, info):
        with torch.no_grad():
            for mask in nn_.masks:
                mask.clamp_(0.0, 1.0)
        for t in nn_.noises:
            t.grad = None

    steps, batch = epoch_steps(len(clean), cfg.epochs, cfg.batch_size, cfg.steps)
    opt = torch.optim.SGD(nn_.masks, lr=cfg.lr, momentum=cfg.momentum)
    hooks = Hooks(transform=augmenter(clean, runtime, cfg.augment), loss=loss, after_step=after_step,
                  **monitor_hooks(monitor, work, max(1, steps // 5)))
    x, y = clean_tensors(clean, runtime)
    history = train(work, x, y, opt, runtime, steps, batch, None, hooks, replacement=True, desc="anp",
                    log_every=max(1, min(10, steps)), generator_offset=502)
    masks = nn_.state_dict()
    pruned = prune_neurons(original, masks, cfg.threshold)
    values = torch.cat([m.flatten() for m in masks.values()])
    extras = {"seconds": time.perf_counter() - t0, "config": asdict(cfg), "mask_state": masks,
              "neurons": int(values.numel()), "pruned": int(sum(pruned.values())), "pruned_per_layer": pruned,
              "noise_abs_max": max(noise_max) if noise_max else 0.0}
    return DefenseResult(original.eval(), history, extras)
