# For every pair of classes (a, b), K half-and-half composites of the defender's clean images (one of a,
# one of b, cut as CBA's HalfMixer cuts them): the largest share of them the model sends to one third
# class c. A composite backdoor (CBA) maps its pair to its target; does that pair stand out from the
# other 44 on the defender's clean images alone? Prints one JSON line per model.
#   python explore/session10-composite-pairs.py results/mnist10k/models/cba-s0-5a3f5f86578a ... [--per-class 50]
import argparse
import json
import statistics

import torch

from nft.attacks.cba import half_mix
from nft.io import load_model
from nft.runs import clean_set, dataset_of
from nft.runtime import Runtime

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("--per-class", type=int, default=50)
ap.add_argument("--k", type=int, default=64)
args = ap.parse_args()
torch.set_num_threads(1)
for run in args.runs:
    rt = Runtime(device="cpu", seed=0, progress=False)
    model, manifest = load_model(run, "cpu")
    model.eval()
    data = dataset_of(manifest)
    clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=args.per_class, seed=manifest.get("seed", 0))
    g = torch.Generator().manual_seed(0)
    nc, rows = data.num_classes, []
    with torch.no_grad():
        for a in range(nc):
            for b in range(a + 1, nc):
                ia, ib = (clean.y == a).nonzero().flatten(), (clean.y == b).nonzero().flatten()
                xa = clean.x[ia[torch.randint(0, len(ia), (args.k,), generator=g)]]
                xb = clean.x[ib[torch.randint(0, len(ib), (args.k,), generator=g)]]
                pred = model(half_mix(xa, xb, g, round(3 * clean.x.shape[-1] / 32))).argmax(1)
                counts = torch.bincount(pred, minlength=nc).float() / args.k
                third = counts.clone()
                third[[a, b]] = -1
                rows.append((a, b, int(third.argmax()), float(third.max())))
    shares = [r[3] for r in rows]
    med = statistics.median(shares)
    mad = statistics.median(abs(s - med) for s in shares) or 1e-6
    top = sorted(rows, key=lambda r: -r[3])[:4]
    print(json.dumps({"run": run, "per_class": args.per_class, "k": args.k, "median": round(med, 3), "mad": round(mad, 3),
                      "top": [{"pair": [a, b], "to": c, "share": round(s, 3), "index": round((s - med) / (1.4826 * mad), 1)}
                              for a, b, c, s in top]}))
