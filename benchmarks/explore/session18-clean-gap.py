"""Diagnostic (run from the repository root: python benchmarks/explore/session18-clean-gap.py; output in
session18-clean-gap.jsonl): rebuild each 1/class grid cell's purified model from its masks and ask whether a proxy the
defender can compute (nft.recovery.clean_gap: the original's accuracy on affine copies of the ten clean images minus the purified model's)
tracks the ACC drop."""
import json, glob, copy, sys
import torch
from safetensors.torch import load_file
from nft.io import load_model
from nft.masks import attach
from nft.runs import dataset_of, clean_set
from nft.purify import recipe, reestimate_bn
from nft.nft_config import for_clean_set
from nft.runtime import Runtime
from nft.evaluate import predict
from nft.recovery import clean_gap
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
out = []
for f in sorted(glob.glob('runs/g/records/*nft_default-n1-*.json')):
    r = json.load(open(f))
    model, man = load_model('runs/g/' + r['artifacts']['backdoored'])
    data = dataset_of(man)
    s = r['seed']
    clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=1, seed=s)
    rt = Runtime(device='cpu', seed=s, progress=False)
    state = load_file('runs/g/' + r['artifacts']['masks'])
    cfg = for_clean_set(recipe('default'), 1)
    m = copy.deepcopy(model)
    for where in ('auto', 'weight'):
        m = copy.deepcopy(model); masks = attach(m, where)
        try:
            masks.load_state_dict(state); break
        except Exception:
            continue
    masks.fold(); reestimate_bn(model, m, clean, cfg, rt); m.eval(); model.eval()
    acc = 100 * (predict(m, data.test.x, rt) == data.test.y).float().mean().item()
    c = clean_gap(model, m, clean, 500, rt)
    row = dict(cell=f"{r['attack']}-s{s}", drop=round(r['before']['acc'] - r['acc'], 2), acc_rebuilt=round(acc, 2),
               acc_rec=round(r['acc'], 2), **c)
    print(json.dumps(row), flush=True)
