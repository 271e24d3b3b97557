"""nft demo: offline, a few minutes on 2 CPU cores.

Trains a BadNets PreActResNet-18 (width 16) on the embedded mnist10k, purifies it with NFT from
50 clean images per class held out from training, and writes the before/after table (Markdown,
JSON) and a plot of ACC/ASR along purification.
"""
from __future__ import annotations

import json
import os

from ..attacks import build_attack
from ..data import load_dataset
from ..evaluate import evaluate, poisoned_test_set
from ..io import StagedDir, atomic_save_safetensors, atomic_write_json, atomic_write_text
from ..plots import purification_curve
from ..profile import measure
from ..purify import RECIPES, purify, recipe
from ..runs import clean_set
from ..trainer import TrainConfig, manifest_for, save_run, train_model
from .common import add_runtime_args, runtime_from


def add_parser(sub):
    p = sub.add_parser("demo", help="backdoor a model on mnist10k, purify it with NFT, print the table")
    p.add_argument("--out", default="nft-demo", help="output directory (default ./nft-demo)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=float, default=8)
    add_runtime_args(p)
    return p


def table(rows: list[dict]) -> str:
    lines = ["| model | ACC % | ASR % | RA % | seconds |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['acc']:.2f} | {r['asr']:.2f} | {r['ra']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def run(args) -> int:
    rt = runtime_from(args)
    staged = StagedDir(args.out, args.overwrite)
    data = load_dataset("mnist10k")
    attack = build_attack(args.attack, num_classes=data.num_classes, image_shape=data.input_shape, seed=args.seed)
    cfg = TrainConfig(arch_kwargs={"width": args.width}, epochs=args.epochs)
    print(f"[1/3] training a {args.attack} PreActResNet-18 (width {args.width}) on mnist10k "
          f"({len(data.train)} images, {cfg.poison_rate:.0%} poisoned)")
    with measure(rt.device) as t_train:
        model, info = train_model(data, cfg, rt, attack)
    poisoned = poisoned_test_set(data.test, attack)
    before = evaluate(model, data.test, runtime=rt, poisoned=poisoned)
    clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=args.per_class, seed=args.seed)
    ncfg = recipe(args.recipe, steps=args.steps)
    print(f"[2/3] purifying with NFT ({args.recipe} recipe, {ncfg.steps} steps) from {len(clean)} clean images")
    monitor = lambda m: evaluate(m, data.test, runtime=rt, poisoned=poisoned)  # noqa: E731
    with measure(rt.device) as t_nft:
        purified, masks, history, extras = purify(model, clean, ncfg, rt, monitor)
    after = evaluate(purified, data.test, runtime=rt, poisoned=poisoned)
    rows = [dict(model="backdoored (no defense)", seconds=t_train.seconds, **before),
            dict(model=f"NFT {args.recipe}, {args.per_class}/class", seconds=t_nft.seconds, **after)]
    md = table(rows)
    print("[3/3] results (ACC on the clean test set; ASR/RA on triggered non-target test images)\n")
    print(md)
    with staged as tmp:
        save_run(os.path.join(tmp, "backdoored"), model, manifest_for(data, cfg, rt, attack, metrics=before),
                 attack, info["history"])
        pman = manifest_for(data, cfg, rt, attack, metrics=after,
                            purified={"defense": "nft", "config": extras["config"], "clean_images": len(clean)})
        save_run(os.path.join(tmp, "purified"), purified, pman, attack)
        atomic_save_safetensors(extras["mask_state"], os.path.join(tmp, "purified", "masks.safetensors"))
        atomic_write_text(md + "\n", os.path.join(tmp, "results.md"))
        atomic_write_json({"rows": rows, "history": history, "peak_mb_nft": t_nft.peak_mb}, os.path.join(tmp, "results.json"))
        purification_curve(history, os.path.join(tmp, "purification.png"),
                           f"NFT ({args.recipe}) on {args.attack}, mnist10k, {args.per_class} clean/class")
    print(f"\nwrote {args.out}/results.md, results.json, purification.png, backdoored/, purified/")
    return 0
