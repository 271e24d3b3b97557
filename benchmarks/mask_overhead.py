"""Time per optimizer step of NFT (masks only) against plain fine-tuning (all weights) of the same
model on the same batch, measured in one run with the two interleaved; prints the ratio.

    python benchmarks/mask_overhead.py [--width 16] [--size 28] [--channels 1] [--batch 128] [--rounds 30]

Both sides run forward + backward + SGD step on one fixed MixUp batch in train mode. The NFT side
has masks attached (placement 'norm', the paper's, and 'auto', the default recipe's) and only the
masks require gradients; the fine-tuning side has no masks and all weights require gradients.
"""
import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from nft import augment as A
from nft.masks import attach
from nft.models import build_model


def step_fn(model, params, x, y):
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preactresnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, a.channels, a.size, a.size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    x, y = A.mixup(x, y, 10, 1.0, g)
    base = build_model(a.model, 10, a.channels, width=a.width).train()

    ft = copy.deepcopy(base)
    sides = {"finetune": step_fn(ft, list(ft.parameters()), x, y)}
    for where in ("norm", "auto"):
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.requires_grad_(False)
        masks = attach(m, where)
        sides[f"nft_{where}"] = step_fn(m, masks.parameters(), x, y)
    for f in sides.values():  # warm-up
        for _ in range(3):
            f()
    times = {k: [] for k in sides}
    for _ in range(a.rounds):  # interleaved, so load from other processes hits all sides alike
        for k, f in sides.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "config": vars(a),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "median_ms_per_step": {k: round(1000 * v, 2) for k, v in med.items()},
        "ratio_nft_norm_over_finetune": round(med["nft_norm"] / med["finetune"], 3),
        "ratio_nft_auto_over_finetune": round(med["nft_auto"] / med["finetune"], 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
