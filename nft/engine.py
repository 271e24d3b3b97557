"""The one training loop, and evaluate(). Models train here; every defense trains here.

Per-step work plugs in through ``Hooks`` (the shape of Lightning Fabric's trainer hooks, without
the dependency): ``transform`` changes a batch (augmentation, on-the-fly poisoning), ``loss``
replaces cross-entropy, ``penalty`` adds a regulariser, ``after_step`` runs after the optimizer
(clip masks, project noise), ``evaluate`` is the caller's evaluation (a defense never gets one).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.core import to_float
from .errors import NFTError
from .runtime import Runtime


class NonFiniteLoss(NFTError):
    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step


@dataclass
class Hooks:
    transform: Callable | None = None  # (x, y, step) -> (x, y)
    loss: Callable | None = None  # (model, x, y, step) -> scalar loss
    penalty: Callable | None = None  # () -> scalar added to the loss
    after_step: Callable | None = None  # (step, info: dict) -> None
    evaluate: Callable | None = None  # (step) -> dict of metrics, run in eval mode
    eval_every: int = 0


def index_batches(n: int, batch_size: int, steps: int, replacement: bool, g: torch.Generator,
                  rank: int = 0, world_size: int = 1, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices into range(n): shuffled epochs, or draws with replacement.

    Under DDP each rank takes its own slice of every global batch.
    """
    made = 0
    while made < steps:
        if replacement:
            order = torch.randint(0, n, (batch_size * world_size,), generator=g)
            chunks = [order]
        else:
            perm = torch.randperm(n, generator=g)
            gb = batch_size * world_size
            stop = (n // gb) * gb if drop_last and n >= gb else n
            chunks = [perm[i:i + gb] for i in range(0, stop, gb)]
        for c in chunks:
            if made >= steps:
                return
            yield c[rank::world_size] if world_size > 1 else c
            made += 1


def steps_for(n: int, batch_size: int, epochs: float, drop_last: bool = True) -> int:
    per_epoch = max(1, n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size))
    return max(1, round(per_epoch * epochs))


def default_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    steps: int,
    batch_size: int = 128,
    scheduler=None,
    hooks: Hooks | None = None,
    replacement: bool = False,
    train_mode: bool = True,
    desc: str = "train",
    log_every: int = 10,
    generator_offset: int = 0,
) -> list[dict]:
    """Run ``steps`` optimizer steps on batches drawn from (x, y). Returns the history.

    ``x`` may be uint8 or float in [0, 1], on any device; batches move to ``runtime.device``.
    ``scheduler`` is stepped after every optimizer step (build it in steps).
    """
    hooks = hooks or Hooks()
    device = runtime.torch_device
    g = runtime.generator(generator_offset)
    loss_fn = hooks.loss or default_loss
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16" and device.type == "cuda")
    history: list[dict] = []
    running, count, t0 = 0.0, 0, time.perf_counter()
    model.train(train_mode)
    bar = tqdm(index_batches(len(y), batch_size, steps, replacement, g, runtime.rank, runtime.world_size),
               total=steps, desc=desc, disable=not (runtime.progress and runtime.is_main), leave=False)
    for step, idx in enumerate(bar, start=1):
        xb = to_float(x[idx].to(device, non_blocking=True))
        yb = y[idx].to(device, non_blocking=True)
        if hooks.transform is not None:
            xb, yb = hooks.transform(xb, yb, step)
        with runtime.autocast():
            loss = loss_fn(model, xb, yb, step)
            if hooks.penalty is not None:
                loss = loss + hooks.penalty()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(step, value)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if hooks.after_step is not None:
            hooks.after_step(step, {"loss": value})
        running, count = running + value, count + 1
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "loss": running / count, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
            running, count = 0.0, 0
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if hooks.evaluate is not None and hooks.eval_every and (step % hooks.eval_every == 0 or step == steps):
                rec.update(hooks.evaluate(step))
                model.train(train_mode)
            history.append(rec)
    bar.close()
    return history


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, runtime: Runtime, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (on CPU) for images x (uint8 or float [0, 1]), in eval mode."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_float(x[i:i + batch_size].to(runtime.torch_device))
        with runtime.autocast():
            out.append(model(xb).argmax(1).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def cosine_schedule(optimizer, steps: int, eta_min: float = 0.0, warmup: int = 0):
    """Per-step cosine decay (with optional linear warm-up) as a LambdaLR."""
    base = optimizer.param_groups[0]["lr"]
    floor = eta_min / base if base else 0.0

    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
