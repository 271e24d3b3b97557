"""Diagnostic (python benchmarks/explore/session19-posthoc.py SHARD NSHARDS > ...jsonl): rebuild each 1/class
grid cell's purified model from its saved masks and score post-hoc variants on the dev half (benchmarks/halves.py):
the final BN step (the delta step with more batches, the variance ratio shrunk to ratio ** p, mean only) and the
mask reset (masks above tau back to 1; masks scaled by 1/c, capped at 1)."""
import copy, json, sys
import torch
from dataclasses import replace
from safetensors.torch import load_file
sys.path[:0] = ['benchmarks', 'benchmarks/explore']
from cells import folded_masks, one_shot_cells
from nft.runs import attack_from_run
from nft.purify import recipe
from nft.nft_config import for_clean_set
from nft.runtime import Runtime
from nft.evaluate import evaluate, poisoned_test_set
from nft.bn import _bn_stats, _tracking_bns, recalibrate_bn

torch.set_num_threads(1)
shard, nshards = int(sys.argv[1]), int(sys.argv[2])


@torch.no_grad()
def delta(original, model, clean, cfg, rt, p=1.0, q=1.0):
    own = _bn_stats(original)
    ref = copy.deepcopy(original)
    recalibrate_bn(ref, clean, cfg, rt)
    before = _bn_stats(ref)
    recalibrate_bn(model, clean, cfg, rt)
    for n, m in _tracking_bns(model).items():
        (mu, var), (mu0, var0) = own[n], before[n]
        m.running_mean.copy_(mu + q * (m.running_mean - mu0))
        m.running_var.copy_(var * ((m.running_var + 1e-5) / (var0 + 1e-5)) ** p)


VARIANTS = {"delta50": dict(n=50), "delta200": dict(n=200), "var_sqrt": dict(n=50, p=0.5), "mean_only": dict(n=50, p=0.0),
            "no_var_50mean": dict(n=50, p=0.0, q=0.5)}
if len(sys.argv) > 3:  # session 19, second run: the mask reset (BN: the delta step from 50 batches)
    VARIANTS = {"delta50": dict(n=50), "reset0.45": dict(n=50, tau=0.45), "reset0.4": dict(n=50, tau=0.4),
                "reset0.35": dict(n=50, tau=0.35), "reset0.3": dict(n=50, tau=0.3), "scale0.5": dict(n=50, c=0.5),
                "scale0.7": dict(n=50, c=0.7)}
for r, model, run, man, data, clean, dev in one_shot_cells(shard, nshards):
    attack = attack_from_run(run, man)
    s = r['seed']
    pois = poisoned_test_set(dev, attack)
    state = load_file('runs/g/' + r['artifacts']['masks'])
    cfg = for_clean_set(recipe('default'), 1)
    row = dict(cell=f"{r['attack']}-s{s}", drop=round(r['before']['acc'] - r['acc'], 2), asr=round(r['asr'], 2))
    rt = Runtime(device='cpu', seed=s, progress=False)
    row['before'] = {k: round(v, 2) for k, v in evaluate(model, dev, runtime=rt, poisoned=pois).items() if k in ('acc', 'asr')}
    for name, v in VARIANTS.items():
        st = state
        if 'tau' in v:
            st = {k: torch.where(x > v['tau'], torch.ones_like(x), x) for k, x in state.items()}
        if 'c' in v:
            st = {k: (x / v['c']).clamp(max=1.0) for k, x in state.items()}
        m = folded_masks(model, st)
        rt = Runtime(device='cpu', seed=s, progress=False)
        delta(model, m, clean, replace(cfg, bn_recal=v['n']), rt, v.get('p', 1.0), v.get('q', 1.0))
        m.eval()
        e = evaluate(m, dev, runtime=rt, poisoned=pois)
        row[name] = [round(e['acc'] - row['before']['acc'], 2), round(e['asr'], 2)]
    print(json.dumps(row), flush=True)
