"""Try attack parameters that `nft train` has no flag for (the evidence behind a changed default).

    python benchmarks/attacks/explore.py train sig --set test_delta=0.3 --rate 0.08 --seed 0 --out /tmp/x
    python benchmarks/attacks/explore.py eval /tmp/x --set test_delta=0.4   # same model, other test-time params

`train` is `nft train --dataset mnist10k --model preactresnet18 --width 16 --threads 1` with the
attack built from its registry defaults plus the ``--set`` overrides; it writes a normal run
directory. `eval` re-evaluates a run directory with test-time parameters overridden (no training).
Values are parsed as JSON when they parse (numbers, lists), else kept as strings.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from nft.commands.purify import parse_sets


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("attack")
    t.add_argument("--set", nargs="*", default=[])
    t.add_argument("--rate", type=float, default=0.1)
    t.add_argument("--mode", default="all2one")
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    e = sub.add_parser("eval")
    e.add_argument("run")
    e.add_argument("--set", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)

    from nft.attacks import build_attack
    from nft.evaluate import evaluate
    from nft.io import load_model, load_safetensors, read_manifest
    from nft.runs import read_dataset
    from nft.runtime import Runtime
    from nft.trainer import TrainConfig, manifest_for, save_run, train_model

    data = read_dataset("mnist10k")
    if args.cmd == "train":
        rt = Runtime(device="cpu", seed=args.seed, threads=1, progress=False)
        attack = build_attack(args.attack, num_classes=data.num_classes, image_shape=data.input_shape, target=0,
                              mode=args.mode, seed=args.seed, **parse_sets(args.set or []))
        epochs = args.epochs or getattr(attack, "train_epochs", None) or TrainConfig.epochs
        cfg = TrainConfig(arch="preactresnet18", arch_kwargs={"width": 16}, epochs=epochs, poison_rate=args.rate)
        t0 = time.perf_counter()
        if hasattr(attack, "fit"):
            attack.fit(data, rt)
        fit_s = time.perf_counter() - t0
        model, info = train_model(data, cfg, rt, attack)
        metrics = evaluate(model, data.test, attack, rt)
        save_run(args.out, model, manifest_for(data, cfg, rt, attack, metrics=metrics, train_seconds=info["seconds"]),
                 attack, info["history"])
        print(json.dumps({"attack": args.attack, "set": args.set, "rate": args.rate, "seed": args.seed, **metrics,
                          "fit_s": round(fit_s), "train_s": round(info["seconds"])}))
    else:
        m = read_manifest(args.run)
        model, _ = load_model(args.run)
        params = {**m["attack"]["params"], **parse_sets(args.set or [])}
        attack = build_attack(m["attack"]["name"], **params)
        art = os.path.join(args.run, "attack.safetensors")
        if os.path.isfile(art):
            attack.load_state_dict(load_safetensors(art))
        print(json.dumps({"run": args.run, "set": args.set, **evaluate(model, data.test, attack)}))


if __name__ == "__main__":
    main()
