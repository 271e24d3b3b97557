"""Train a benign or backdoored model through the engine, and save it as a run directory."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from .augment import train_transform
from .data.core import DatasetSplits
from .engine import Hooks, steps_for, train
from .io import atomic_save_safetensors, atomic_write_json, save_model
from .models import build_model
from .runtime import Runtime


@dataclass
class TrainConfig:
    arch: str = "preactresnet18"
    arch_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 16} for the CPU benchmark
    epochs: float = 8  # enough on mnist10k for ~99% ACC and 100% ASR at width 16
    batch_size: int = 128
    lr: float = 0.1  # one-cycle peak, SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poison_rate: float = 0.1
    augment: str | None = None  # None: the dataset's own ('shift' for digits, 'crop_flip' for CIFAR)


def setup_distributed(runtime: Runtime) -> bool:
    """Join the process group that torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR in the environment):
    nccl on CUDA, gloo on CPU. Returns whether training is distributed."""
    if not runtime.distributed:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = runtime.torch_device.type == "cuda"
        if cuda:
            torch.cuda.set_device(runtime.torch_device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=runtime.rank, world_size=runtime.world_size)
    return True


def train_model(data: DatasetSplits, cfg: TrainConfig, runtime: Runtime, attack=None, monitor=None):
    """Poison the training set with ``attack`` (if any), train, and return (model, info).

    Under torchrun (``runtime.world_size`` > 1) the model trains wrapped in DistributedDataParallel;
    each rank takes its slice of every global batch, and the plain model comes back on every rank.
    """
    runtime.seed_everything()
    model = build_model(cfg.arch, data.num_classes, data.input_shape[0], data.mean, data.std,
                        **cfg.arch_kwargs).to(runtime.torch_device)
    net = model
    if setup_distributed(runtime):
        from torch.nn.parallel import DistributedDataParallel

        cuda = runtime.torch_device.type == "cuda"
        net = DistributedDataParallel(model, device_ids=[runtime.torch_device.index] if cuda else None)
    x, y, poison_idx = data.train.x, data.train.y, torch.empty(0, dtype=torch.long)
    if attack is not None and cfg.poison_rate > 0:
        x, y, poison_idx = attack.poison_train(x, y, cfg.poison_rate, runtime.generator(101))
    aug = train_transform(cfg.augment or data.augment)
    g = runtime.generator(202, device=runtime.device)
    attack_hooks = attack.train_hooks(runtime) if attack is not None else None
    transform = (lambda xb, yb, step: (aug(xb, g), yb))
    if attack_hooks is not None and attack_hooks.transform is not None:
        inner = attack_hooks.transform
        transform = (lambda xb, yb, step: inner(aug(xb, g), yb, step))
    hooks = Hooks(transform=transform, loss=getattr(attack_hooks, "loss", None),
                  after_step=getattr(attack_hooks, "after_step", None),
                  evaluate=monitor and (lambda step: monitor(model)), eval_every=0)
    steps = steps_for(len(y), cfg.batch_size * runtime.world_size, cfg.epochs)  # batch_size is per rank
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=True)
    # OneCycleLR divides by zero below ~5 steps; such tiny runs (smoke tests) keep a constant lr
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.25)
             if steps >= 8 else None)
    t0 = time.perf_counter()
    history = train(net, x, y, opt, runtime, steps, cfg.batch_size, sched, hooks, desc="train")
    info = {"seconds": time.perf_counter() - t0, "history": history, "poison_index": poison_idx,
            "num_poisoned": int(len(poison_idx))}
    return model, info


def manifest_for(data: DatasetSplits, cfg: TrainConfig, runtime: Runtime, attack=None, **extra) -> dict:
    return {
        "arch": cfg.arch,
        "arch_kwargs": cfg.arch_kwargs,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "mean": list(data.mean),
        "std": list(data.std),
        "dataset": data.name,
        "augment": cfg.augment or data.augment,
        "attack": None if attack is None else {"name": attack.name, "params": attack.params(),
                                               **({"fit_stats": attack.fit_stats} if getattr(attack, "fit_stats", None) else {})},
        "train": asdict(cfg),
        "seed": runtime.seed,
        **extra,
    }


def save_run(run_dir: str, model, manifest: dict, attack=None, history=None) -> dict:
    """Attack artifact first, then weights + manifest (the manifest is written last: its presence
    marks a complete run directory)."""
    os.makedirs(run_dir, exist_ok=True)
    if attack is not None and attack.state_dict():
        atomic_save_safetensors(attack.state_dict(), os.path.join(run_dir, "attack.safetensors"))
    if history is not None:
        atomic_write_json(history, os.path.join(run_dir, "history.json"))
    return save_model(model, run_dir, manifest)


def finish_distributed() -> None:
    """Wait for every rank, then leave the process group (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
