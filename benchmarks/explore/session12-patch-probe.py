"""nft.searches.patch_probe on saved run directories: does a universal patch in one window send the defender's
clean images to one class far more often on a patch-trigger model than on the others? (benchmarks/NOTES.md §18)

    python benchmarks/explore/session12-patch-probe.py RUN_DIR [RUN_DIR ...] --per-class 50 --steps 40 [--corners]
One JSON line per run. ``--corners`` (session 13) adds the four-corner window as the last row.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nft.io import load_model  # noqa: E402
from nft.runs import clean_set, dataset_of  # noqa: E402
from nft.searches import patch_probe  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--side", type=float, default=0.25)
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=144)
    ap.add_argument("--corners", action="store_true")
    ap.add_argument("--gen-seed", type=int, default=909, help="the probe's generator (purify's: 1000003 * seed + 709)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for run in a.runs:
        model, man = load_model(run)
        data = dataset_of(man)
        clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=a.per_class,
                          seed=man.get("seed", 0))  # the grid's pick: the model's seed (all session-12 lines: 0)
        t0 = time.perf_counter()
        p = patch_probe(model, clean.x, clean.y, a.side, a.grid, a.step, a.steps, a.batch, torch.Generator().manual_seed(a.gen_seed),
                        a.corners)
        print(json.dumps({"run": run, "per_class": a.per_class, "side": a.side, "grid": a.grid, "steps": a.steps,
                          "corners": a.corners, "gen_seed": a.gen_seed, **p,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
