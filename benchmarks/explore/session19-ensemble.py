"""Dev-half study (python benchmarks/explore/session19-ensemble.py SHARD NSHARDS [SEEDS] > ...jsonl): for each 1/class grid
cell, run NFT `default` once more on the same model and ten clean images with another runtime seed (seed + 1000),
and score on the dev half (benchmarks/halves.py): the grid cell's purified model (rebuilt from its saved masks), the
second run alone, and the mean of the two runs' masks folded into the original with the BN delta step (a channel one
run closed by chance is half open; one both runs closed stays closed; NOTES §13 found +0.5 to 1 point of ACC over
the average run on FBA and LF s1 with three runs). The second run's masks are kept under runs/x/ens/."""
import json, os, sys
import torch
from safetensors.torch import load_file, save_file
sys.path[:0] = ['benchmarks', 'benchmarks/explore']
from cells import folded_masks, one_shot_cells
from nft.runs import attack_from_run
from nft.purify import recipe, reestimate_bn, purify
from nft.nft_config import for_clean_set
from nft.runtime import Runtime
from nft.evaluate import evaluate, poisoned_test_set

torch.set_num_threads(1)
shard, nshards = int(sys.argv[1]), int(sys.argv[2])
os.makedirs('runs/x/ens', exist_ok=True)


def folded(model, state, clean, cfg, rt):
    m = folded_masks(model, state)
    reestimate_bn(model, m, clean, cfg, rt)
    return m.eval()


seeds = sys.argv[3] if len(sys.argv) > 3 else '012'  # e.g. '0': only the seed-0 cells
for r, model, run, man, data, clean, dev in one_shot_cells(shard, nshards, seeds):
    attack = attack_from_run(run, man)
    s = r['seed']
    cell = f"{r['attack']}-s{s}"
    pois = poisoned_test_set(dev, attack)
    cfg = for_clean_set(recipe('default'), 1)
    score = lambda m, rt: {k: round(v, 2) for k, v in evaluate(m, dev, runtime=rt, poisoned=pois).items() if k in ('acc', 'asr')}
    rt = Runtime(device='cpu', seed=s, progress=False)
    before = score(model, rt)
    a = load_file('runs/g/' + r['artifacts']['masks'])
    path = f'runs/x/ens/{cell}-m1.safetensors'
    if os.path.exists(path):
        b = load_file(path)
        row1 = None
    else:
        rt1 = Runtime(device='cpu', seed=s + 1000, progress=False)
        pm, masks, hist, ex = purify(model, clean, cfg, rt1)
        b = {k: v.contiguous() for k, v in ex['mask_state'].items()}
        save_file(b, path)
        row1 = score(pm, rt1)
    rows = {"grid": score(folded(model, a, clean, cfg, Runtime(device='cpu', seed=s, progress=False)), rt),
            "run2": row1,
            "mean2": score(folded(model, {k: (a[k] + b[k]) / 2 for k in a}, clean, cfg, Runtime(device='cpu', seed=s, progress=False)), rt),
            "min2": score(folded(model, {k: torch.minimum(a[k], b[k]) for k in a}, clean, cfg, Runtime(device='cpu', seed=s, progress=False)), rt)}
    out = {"cell": cell, "before": before}
    for k, v in rows.items():
        if v is not None:
            out[k] = [round(v['acc'] - before['acc'], 2), v['asr']]
    print(json.dumps(out), flush=True)
