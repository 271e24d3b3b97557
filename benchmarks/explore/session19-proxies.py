"""Diagnostic (python benchmarks/explore/session19-proxies.py SHARD NSHARDS > ...jsonl): rebuild each 1/class grid
cell's purified model from its saved masks (BN delta step, as the cell did) and compute proxies the defender can
compute from the ten clean images and the original model, to see which tracks the dev-half ACC drop
(benchmarks/halves.py): nft.recovery's affine accuracy gap; the gap in the true class's log-probability on the same
copies; the accuracy gap under a stronger affine; disagreement with the original on MixUp pairs and on noisy copies."""
import json, sys
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
sys.path[:0] = ['benchmarks', 'benchmarks/explore']
from nft import augment as A
from nft.data.core import to_float
from cells import folded_masks, one_shot_cells
from nft.purify import recipe, reestimate_bn
from nft.nft_config import for_clean_set
from nft.runtime import Runtime
from nft.evaluate import evaluate
from nft.recovery import AFFINE

torch.set_num_threads(1)
shard, nshards = int(sys.argv[1]), int(sys.argv[2])
STRONG = {"degrees": 30.0, "scale": (0.7, 1.2), "shear": 0.3, "translate": 0.3}


@torch.no_grad()
def logits(m, x):
    m.eval()
    return torch.cat([m(x[i:i + 500]) for i in range(0, len(x), 500)])


def proxies(orig, pur, clean, n=1000):
    g = torch.Generator().manual_seed(810)
    idx = torch.arange(n) % len(clean)
    x0, y = to_float(clean.x[idx]), clean.y[idx]
    out = {}
    for name, kw in (("affine", AFFINE), ("strong", STRONG)):
        x = A.affine(x0, g, **kw)
        lo, lp = logits(orig, x), logits(pur, x)
        out[name + "_gap"] = round(100 * ((lo.argmax(1) == y).float().mean() - (lp.argmax(1) == y).float().mean()).item(), 2)
        out[name + "_nll_gap"] = round((F.cross_entropy(lp, y) - F.cross_entropy(lo, y)).item(), 4)
        out[name + "_disagree"] = round(100 * (lo.argmax(1) != lp.argmax(1)).float().mean().item(), 2)
    j = torch.randperm(n, generator=g)
    lam = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    x = lam * A.affine(x0, g, **AFFINE) + (1 - lam) * A.affine(x0[j], g, **AFFINE)
    lo, lp = logits(orig, x), logits(pur, x)
    out["mixup_disagree"] = round(100 * (lo.argmax(1) != lp.argmax(1)).float().mean().item(), 2)
    out["mixup_kl"] = round(F.kl_div(F.log_softmax(lp, 1), F.log_softmax(lo, 1), log_target=True, reduction="batchmean").item(), 4)
    x = (A.affine(x0, g, **AFFINE) + 0.3 * torch.randn(x0.shape, generator=g)).clamp(0, 1)
    lo, lp = logits(orig, x), logits(pur, x)
    out["noise_gap"] = round(100 * ((lo.argmax(1) == y).float().mean() - (lp.argmax(1) == y).float().mean()).item(), 2)
    out["noise_disagree"] = round(100 * (lo.argmax(1) != lp.argmax(1)).float().mean().item(), 2)
    return out


for r, model, run, man, data, clean, dev in one_shot_cells(shard, nshards):
    s = r['seed']
    state = load_file('runs/g/' + r['artifacts']['masks'])
    cfg = for_clean_set(recipe('default'), 1)
    rt = Runtime(device='cpu', seed=s, progress=False)
    m = folded_masks(model, state)
    reestimate_bn(model, m, clean, cfg, rt)
    m.eval(); model.eval()
    acc0 = evaluate(model, dev, runtime=rt)['acc']
    acc1 = evaluate(m, dev, runtime=rt)['acc']
    row = dict(cell=f"{r['attack']}-s{s}", drop=round(r['before']['acc'] - r['acc'], 2), dev_drop=round(acc0 - acc1, 2),
               **proxies(model, m, clean))
    print(json.dumps(row), flush=True)
