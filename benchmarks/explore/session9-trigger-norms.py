# Diagnostic (knows the trigger): mean |delta| per pixel, RMS and pixels changed > 0.05 of each s0 trigger on
# 500 eligible test images. Run from benchmarks/: python explore/session9-trigger-norms.py
import json, sys, glob, os, torch
sys.path.insert(0, '.')
from nft.runs import attack_from_run, dataset_of
from nft.io import load_model
from nft.evaluate import poisoned_test_set
torch.set_num_threads(1)
for run in sorted(glob.glob('results/mnist10k/models/*-s0-*')):
    if run.endswith('.lock'): continue
    try:
        _, man = load_model(run)
    except Exception as e:
        print(run, e); continue
    data = dataset_of(man); attack = attack_from_run(run, man)
    test = data.test
    keep = attack.eligible(test.y) if not hasattr(attack, 'test_set') else None
    if keep is None: print(run.split('/')[-1], 'cba: composite'); continue
    x0 = test.x[keep][:500]
    x, _ = attack.apply(x0, test.y[keep][:500])
    f = lambda t: t.float() / 255 if t.dtype == torch.uint8 else t.float()
    d = (f(x) - f(x0)).flatten(1)
    print(f"{run.split('/')[-1]:32s} L1 mean/pix {d.abs().mean(1).mean():.4f}  RMS {d.pow(2).mean(1).sqrt().mean():.4f}  nnz(>0.05) {(d.abs()>0.05).sum(1).float().mean():.0f}")
