"""Which class is a backdoored model's target? nft.searches.targeted_probe on the defender's clean set (the loop
this script had first, now that function; NOTES.md §32 gives its first two lines).

For each class c: one universal delta in NFT's input-search ball (L2, eps 0.15 RMS a pixel), `--steps` normalised
steps *down* the cross-entropy to c on the clean images not of class c; the share of those images it then sends to
c. A backdoor target should stand out (Neural Cleanse's reasoning, in a fixed ball instead of a minimal norm). Compared
with the class NFT's untargeted search voted for (`search_target` in the records). One JSON line per model.

    python benchmarks/explore/session28-target-probe.py runs/g/models/sig-s3-* ... --per-class 50 --clean-seed S
"""
import argparse
import json
import time

import torch

from nft.io import load_model
from nft.runs import clean_set, dataset_of
from nft.searches import targeted_probe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--clean-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eps", type=float, default=0.15)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for run in a.runs:
        t0 = time.perf_counter()
        model, man = load_model(run)
        data = dataset_of(man)
        clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=a.per_class, seed=a.clean_seed)
        out = targeted_probe(model.eval(), clean.x, clean.y, data.num_classes, a.eps, 0.25, a.steps, 64,
                             torch.Generator().manual_seed(710))
        print(json.dumps({"run": run, "eps": a.eps, "steps": a.steps, "per_class": a.per_class, "clean_seed": a.clean_seed,
                          **out, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
