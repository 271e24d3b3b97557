"""Per-class dev-half accuracy before and after NFT (a diagnostic: where does the ACC go?).

    python benchmarks/explore/session11-perclass.py RUN_DIR --per-class 50 --try 'wide=0.5' [--try ...]
One JSON line per setting: per-class recall before/after, and the classes the lost images went to.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from explore_nft import parse  # noqa: E402
from halves import halves  # noqa: E402
from nft.engine import predict  # noqa: E402
from nft.io import load_model  # noqa: E402
from nft.purify import purify, recipe  # noqa: E402
from nft.runs import clean_set, dataset_of  # noqa: E402
from nft.runtime import Runtime  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--try", dest="tries", action="append", required=True)
    ap.add_argument("--per-class", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, man = load_model(a.run)
    data = dataset_of(man)
    clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=a.per_class, seed=0)
    dev = halves(data.test, data.num_classes)[0]
    rt = Runtime(device="cpu", seed=0, progress=False)
    k = data.num_classes

    def confusion(m):
        pred = predict(m, dev.x, rt)
        c = torch.zeros(k, k, dtype=torch.long)
        c.index_put_((dev.y.long(), pred.long()), torch.ones(len(pred), dtype=torch.long), accumulate=True)
        return c

    c0 = confusion(model)
    for t in a.tries:
        over = parse(t)
        pm = purify(model, clean, recipe(over.pop("recipe", "default"), **over), rt)[0]
        c1 = confusion(pm)
        recall = lambda c: [round(100 * float(c[i, i]) / float(c[i].sum()), 1) for i in range(k)]  # noqa: E731
        off = (c1 - torch.diag(torch.diag(c1))).sum(0) - (c0 - torch.diag(torch.diag(c0))).sum(0)
        print(json.dumps({"run": a.run, "try": t, "per_class": a.per_class, "recall_before": recall(c0),
                          "recall_after": recall(c1), "extra_errors_predicted_as": off.tolist()}), flush=True)


if __name__ == "__main__":
    main()
