"""Which class is a backdoored model's target? A targeted universal search per class on the defender's clean set.

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
from nft.searches import UniversalPerturbation


def targeted_rates(model, x, y, num_classes, eps=0.15, step=0.25, steps=40, batch=64, seed=0):
    model.eval()
    rates = []
    for c in range(num_classes):
        g = torch.Generator().manual_seed(seed * 100 + c)
        xs = x[y != c]
        search = UniversalPerturbation(tuple(x.shape[1:]), eps, step, "cpu", g)
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (min(batch, len(xs)),), generator=g)
            d = search.delta.clone().requires_grad_(True)
            loss = -torch.nn.functional.cross_entropy(model((xs[idx] + d).clamp(0, 1)), torch.full((len(idx),), c))
            (grad,) = torch.autograd.grad(loss, d)
            search.delta = search._ascent(d.detach(), grad)
        with torch.no_grad():
            pred = torch.cat([model(search.apply(xs[i:i + 256])).argmax(1) for i in range(0, len(xs), 256)])
        rates.append(round(100 * float((pred == c).float().mean()), 2))
    return rates


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
        x = clean.x.float() / 255 if clean.x.dtype == torch.uint8 else clean.x
        rates = targeted_rates(model, x, clean.y, data.num_classes, eps=a.eps, steps=a.steps, seed=a.clean_seed)
        order = sorted(range(len(rates)), key=lambda c: -rates[c])
        print(json.dumps({"run": run, "eps": a.eps, "steps": a.steps, "per_class": a.per_class, "clean_seed": a.clean_seed, "rates": rates,
                          "top": order[0], "second": order[1], "margin": round(rates[order[0]] - rates[order[1]], 2),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
