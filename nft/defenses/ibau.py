"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022); official YiZeng623/I-BAU.

min_theta max_delta  mean_i CE(f_theta(x_i + delta), y_i), one universal perturbation delta.
Per round:

1. delta from 0, one pass over the clean set of SGD (lr 10) on
   -CE(f(x + delta), argmax f(x)) + 0.001 ||delta||^2, projected onto an L2 ball (the notebook's
   radius 10 at 3x32x32; here scaled by sqrt(pixels / 3072), the same RMS per pixel);
2. one pass of outer steps. Each takes the implicit hypergradient of the outer loss
   L(theta) = CE on the batch with delta added to ``portion`` of its images, through the inner
   fixed-point map Phi(delta, theta) = delta - 0.1 * grad_delta[-CE(f(x + delta), y) + 0.001 ||delta||^2]:
   v <- (dPhi/ddelta)^T v + dL/ddelta for K iterations from v = 0, then
   grad = dL/dtheta + (dPhi/dtheta)^T v. The engine's Adam steps on it (common.surrogate).

Deviations from the official code, both quirks the spec names: the fixed-point map is evaluated on
the current batch (the official code always uses the first clean batch), and BatchNorm running
statistics are not updated by the perturbed forwards. The official ``portion`` 0.01 puts delta on
int(0.01 * batch) images; at least one here, so small batches still see it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..engine import Hooks, train
from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import augmenter, clean_tensors, epoch_steps, frozen_bn_stats, mean_ce, prepare, surrogate


@dataclass
class IBAUConfig:
    n_rounds: int = 5  # official (README example 3; BB 5)
    K: int = 5  # official: fixed-point iterations
    lr: float = 1e-3  # official: Adam 1e-3 (BB: 1e-4)
    batch_size: int = 100  # official (BB: 256)
    inner_lr: float = 10.0  # official: SGD lr on delta
    inner_reg: float = 1e-3  # official: weight of ||delta||^2
    fp_lr: float = 0.1  # official: step of the fixed-point map
    radius: float | None = 10.0  # notebook: L2 ball at 3x32x32, scaled by sqrt(pixels / 3072); None = no projection
    portion: float = 0.01  # official: share of each outer batch that receives delta
    augment: str | None = None  # None: the clean set's standard augmentation


def project_l2_(delta: torch.Tensor, radius: float | None) -> None:
    if radius is not None:
        with torch.no_grad():
            delta.mul_(min(1.0, radius / (float(delta.norm()) + 1e-12)))


def hypergradient(model, params, delta, x, y, cfg: IBAUConfig, g: torch.Generator):
    """(outer loss, d outer / d theta including the implicit term) for one batch."""
    n = len(x)
    pick = torch.randperm(n, generator=g, device=g.device)[: max(1, int(n * cfg.portion))].to(x.device)
    on = torch.zeros(n, *([1] * (x.dim() - 1)), device=x.device)
    on[pick] = 1.0
    d = delta.detach().requires_grad_(True)
    outer = F.cross_entropy(model(x + on * d), y)
    *direct, v0 = torch.autograd.grad(outer, params + [d], allow_unused=True)
    with frozen_bn_stats(model), sdpa_kernel(SDPBackend.MATH):  # attention's fused kernels lack double backward
        inner = -F.cross_entropy(model(x + d), y) + cfg.inner_reg * d.pow(2).sum()
        g_d = torch.autograd.grad(inner, d, create_graph=True)[0]
    mapped = d - cfg.fp_lr * g_d  # the fixed-point map Phi(delta, theta)
    v = torch.zeros_like(d)
    for _ in range(cfg.K):
        v = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)[0] + v0
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    grads = [a if b is None else b if a is None else a + b for a, b in zip(direct, implicit)]
    return outer, grads


def outer_loss(params, delta, cfg: IBAUConfig, g: torch.Generator):
    def loss(model, x, y, step):
        outer, grads = hypergradient(model, params, delta, x, y, cfg, g)
        return surrogate(outer, params, grads)
    return loss


@DEFENSES.register("ibau")
def defend_ibau(model, clean, cfg: IBAUConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, IBAUConfig) else config_with(IBAUConfig, cfg or {})
    model, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    x, y = clean_tensors(clean, runtime)
    shape = (1, *x.shape[1:])
    radius = cfg.radius * math.sqrt(x[0].numel() / 3072) if cfg.radius is not None else None
    params = [p for p in model.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps, batch = epoch_steps(len(clean), 1, cfg.batch_size)
    g = runtime.generator(811, device=runtime.device)
    history, rounds = [], []
    for r in range(cfg.n_rounds):
        # 1. the universal perturbation, against the model's own predictions
        delta = torch.zeros(shape, device=x.device, requires_grad=True)
        dopt = torch.optim.SGD([delta], lr=cfg.inner_lr)
        for p in params:
            p.requires_grad_(False)

        def delta_loss(m, xb, yb, step):
            with torch.no_grad():
                pseudo = m(xb).argmax(1)
            return -F.cross_entropy(m(xb + delta), pseudo) + cfg.inner_reg * delta.pow(2).sum()

        hooks = Hooks(transform=augmenter(clean, runtime, cfg.augment, 10 + r), loss=delta_loss,
                      after_step=lambda s, info: project_l2_(delta, radius))
        history += [{"phase": "delta", "round": r, **h} for h in
                    train(model, x, y, dopt, runtime, steps, batch, None, hooks, replacement=True, train_mode=False,
                          desc="ibau-delta", log_every=steps, generator_offset=820 + r)]
        for p in params:
            p.requires_grad_(True)
        model.eval()
        with torch.no_grad():
            pseudo = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
        ce_clean, ce_delta = mean_ce(model, x, pseudo), mean_ce(model, x + delta.detach(), pseudo)
        # 2. unlearn: outer steps on the implicit hypergradient
        hooks = Hooks(transform=augmenter(clean, runtime, cfg.augment, 20 + r), loss=outer_loss(params, delta, cfg, g))
        history += [{"phase": "unlearn", "round": r, **h} for h in
                    train(model, x, y, opt, runtime, steps, batch, None, hooks, replacement=True,
                          desc="ibau-unlearn", log_every=steps, generator_offset=840 + r)]
        rounds.append({"round": r, "delta_l2": float(delta.detach().norm()), "ce_clean": ce_clean,
                       "ce_with_delta": ce_delta})
        if monitor is not None:
            history.append({"round": r, **monitor(model)})
    model.eval()
    extras = {"seconds": time.perf_counter() - t0, "config": asdict(cfg), "rounds": rounds, "radius": radius}
    return DefenseResult(model, history, extras)

