"""nft train: train a benign or backdoored model and save it as a run directory."""
from __future__ import annotations

import json

from ..attacks import build_attack
from ..attacks.base import fit_attack
from ..errors import NFTError
from ..evaluate import evaluate
from ..io import StagedDir, model_from_manifest, probe
from ..registry import ATTACKS, DATASETS, MODELS
from ..runs import read_dataset
from ..trainer import TrainConfig, finish_distributed, manifest_for, save_run, train_model
from .common import add_runtime_args, nonneg_int, positive_float, positive_int, runtime_from, unit_float


def add_parser(sub):
    p = sub.add_parser("train", help="train a benign or backdoored model")
    p.add_argument("--dataset", default="mnist10k", help=f"one of {DATASETS.names()}")
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--model", default="preactresnet18", help="a registered model or torchvision:NAME")
    p.add_argument("--width", type=positive_int, default=None, help="channel width (PreActResNet-18: 64 full, 16 on CPU)")
    p.add_argument("--attack", default=None, help=f"one of {ATTACKS.names()}; omit for a benign model")
    p.add_argument("--target", type=nonneg_int, default=0)
    p.add_argument("--label-mode", default="all2one", choices=["all2one", "all2all"])
    p.add_argument("--poison-rate", type=unit_float, default=0.1)
    p.add_argument("--epochs", type=positive_float, default=None,
                   help="default: the attack's own train_epochs if it has one, else the trainer's 8")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true")
    add_runtime_args(p)
    return p


def run(args) -> int:
    rt = runtime_from(args)
    staged = StagedDir(args.out, args.overwrite)  # refuse an existing directory before any work
    if not args.model.startswith("torchvision:"):
        MODELS.get(args.model)  # an unknown name fails here, with a did-you-mean, before the data loads
    if args.attack:
        ATTACKS.get(args.attack)
    data = read_dataset(args.dataset, args.data_root, args.download)
    if args.attack and args.target >= data.num_classes:
        raise NFTError(f"--target {args.target} is not a class of {data.name} (0..{data.num_classes - 1})")
    spec = {"arch": args.model, "arch_kwargs": {"width": args.width} if args.width else {}, "num_classes": data.num_classes,
            "input_shape": list(data.input_shape), "mean": list(data.mean), "std": list(data.std)}
    probe(model_from_manifest(spec, f"--model {args.model}"), spec, f"--model {args.model}")  # fail before training
    attack = None
    if args.attack:
        attack = build_attack(args.attack, num_classes=data.num_classes, image_shape=data.input_shape,
                              target=args.target, mode=args.label_mode, seed=args.seed)
    epochs = args.epochs if args.epochs is not None else (getattr(attack, "train_epochs", None) or TrainConfig.epochs)
    cfg = TrainConfig(arch=args.model, arch_kwargs={"width": args.width} if args.width else {}, epochs=epochs,
                      batch_size=args.batch_size, lr=args.lr, poison_rate=args.poison_rate if attack else 0.0)
    if attack is not None:
        fit_attack(attack, data, rt)
    model, info = train_model(data, cfg, rt, attack)
    metrics = evaluate(model, data.test, attack, rt)
    manifest = manifest_for(data, cfg, rt, attack, metrics=metrics, train_seconds=info["seconds"],
                            world_size=rt.world_size)
    if rt.is_main:  # under torchrun only rank 0 writes the run directory
        with staged as tmp:
            save_run(tmp, model, manifest, attack, info["history"])
        print(json.dumps({"out": args.out, **metrics, "train_seconds": round(info["seconds"], 1)}))
    finish_distributed()
    return 0
