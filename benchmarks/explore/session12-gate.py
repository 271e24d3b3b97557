"""Does a targeted universal search on the defender's clean images tell a backdoor NFT left open from a
closed one? (A diagnostic for a gate on NFT's wider search; benchmarks/NOTES.md §18.)

    python benchmarks/explore/session12-gate.py RUN_DIR [RUN_DIR ...] --per-class 50 --try '' --try 'wide=0.5'

For the model as given and after each --try (runtime seed 0): per class c, one universal delta in an L2 ball of
``--eps`` (RMS per pixel) pushed ``--steps`` normalised-gradient steps down the cross-entropy to c on the clean
images not of class c, and the share of those images it then sends to c; the anomaly index of the largest share
among the classes' (Neural Cleanse's rule). Dev-half ACC/ASR beside it. One JSON line per (run, model state).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from explore_nft import parse  # noqa: E402
from halves import halves  # noqa: E402
from nft.evaluate import evaluate, poisoned_test_set  # noqa: E402
from nft.io import load_model  # noqa: E402
from nft.purify import purify, recipe  # noqa: E402
from nft.runs import attack_from_run, clean_set, dataset_of  # noqa: E402
from nft.runtime import Runtime  # noqa: E402


def targeted_rates(model, x, y, num_classes, eps, steps, batch, g):
    """Per class c: the share of the clean images not of c that one searched universal delta sends to c."""
    model.eval()
    shape = x.shape[1:]
    radius = eps * math.sqrt(math.prod(shape))
    rates = []
    for c in range(num_classes):
        xs = x[y != c]
        d = torch.randn(shape, generator=g)
        d = d * (0.5 * radius / d.norm())
        tgt = torch.full((batch,), c, dtype=torch.long)
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (min(batch, len(xs)),), generator=g)
            d.requires_grad_(True)
            loss = nn.functional.cross_entropy(model((xs[idx] + d).clamp(0, 1)), tgt[:len(idx)])
            (grad,) = torch.autograd.grad(loss, d)
            d = d.detach() - 0.25 * radius * grad / (grad.norm() + 1e-12)
            d = d * min(1.0, radius / float(d.norm() + 1e-12))
        with torch.no_grad():
            pred = torch.cat([model((xs[i:i + 256] + d).clamp(0, 1)).argmax(1) for i in range(0, len(xs), 256)])
        rates.append(round(float((pred == c).float().mean()), 4))
    med = statistics.median(rates)
    mad = statistics.median(abs(r - med) for r in rates)
    top = max(range(num_classes), key=lambda c: rates[c])
    return {"rates": rates, "top": top, "share": rates[top], "median": round(med, 4),
            "index": round((rates[top] - med) / (1.4826 * mad + 1e-12), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--try", dest="tries", action="append", default=[])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.25])
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for run in a.runs:
        model, man = load_model(run)
        data = dataset_of(man)
        clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=a.per_class, seed=0)
        dev = halves(data.test, data.num_classes)[0]
        pois = poisoned_test_set(dev, attack_from_run(run, man))
        rt = Runtime(device="cpu", seed=0, progress=False)

        def probes(m):
            return {f"eps{e:g}": targeted_rates(m, clean.x, clean.y, data.num_classes, e, a.steps, 64,
                                                torch.Generator().manual_seed(909)) for e in a.eps}

        states = [("none", model, None)]
        for t in a.tries:
            over = parse(t)
            t0 = time.perf_counter()
            pm = purify(model, clean, recipe(over.pop("recipe", "default"), **over), rt)[0]
            states.append((t or "default", pm, round(time.perf_counter() - t0, 1)))
        for name, m, secs in states:
            t0 = time.perf_counter()
            p = probes(m)
            ev = evaluate(m, dev, runtime=rt, poisoned=pois)
            print(json.dumps({"run": run, "per_class": a.per_class, "state": name, "nft_seconds": secs,
                              "acc": round(ev["acc"], 2), "asr": round(ev["asr"], 2), **p,
                              "probe_seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
