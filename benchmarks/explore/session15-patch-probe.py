# NOTES §20: what the patch probe (as nft.purify runs it, generator 709 of the runtime seed) flags on each
# model with the grid's clean pick (bench: clean seed = the cell's seed). One JSON line per (model, per-class).
#   python explore/session15-patch-probe.py ../runs/g/models/* --per-class 1 5 --seed 0
# --copies K (session 16): the probe searches and scores on K shifted copies of the clean images (the clean set's
# own augmentation, CPU generator 710) instead of the images themselves (K = 1, the default: as purify runs it).
import argparse
import json

import torch

from nft import augment as A
from nft.io import load_model
from nft.nft_config import recipe
from nft.runs import clean_set, dataset_of
from nft.runtime import Runtime
from nft.searches import patch_probe

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("--per-class", nargs="+", type=int, default=[1])
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--copies", nargs="+", type=int, default=[1])
a = ap.parse_args()
torch.set_num_threads(1)
cfg = recipe("default")
for run in a.runs:
    if run.endswith(".lock"):
        continue
    model, man = load_model(run)
    data = dataset_of(man)
    for n in a.per_class:
        clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=n, seed=a.seed)
        for k in a.copies:
            x, y = clean.x, clean.y
            if k > 1:
                ga, base = torch.Generator().manual_seed(710), A.train_transform(clean.augment)
                x, y = torch.cat([base(clean.x, ga) for _ in range(k)]), clean.y.repeat(k)
            rt = Runtime(device="cpu", seed=a.seed, progress=False)
            p = patch_probe(model.eval(), x, y, cfg.wide_side, cfg.wide_grid, cfg.wide_step,
                            cfg.patch_probe_steps, 16 * cfg.wide_grid ** 2, rt.generator(709), cfg.wide_corners)
            flagged = [w for w, (s, _) in enumerate(p["windows"]) if s >= cfg.patch_probe and p["median"] <= cfg.patch_probe_median]
            print(json.dumps({"run": run.rstrip("/").rsplit("/", 1)[-1], "per_class": n, "flagged": flagged,
                              **({"copies": k} if k > 1 else {}), **p}), flush=True)
