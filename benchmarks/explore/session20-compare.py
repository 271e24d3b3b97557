"""Session 20's one-shot arms against the grid runs (python benchmarks/explore/session20-compare.py [TRY ...]).

Arms: the lines of explore/session20.jsonl (`explore_nft.py --per-class 1 --clean-seed S --runtime-seeds S --curve`,
each grid cell's own clean pick and runtime seed, dev half). Baseline: the same cell's grid run on the dev half, rebuilt
from its saved masks (explore/session19-ensemble.jsonl 'grid', else session19-posthoc-reset.jsonl 'delta50').
Prints ACC change / ASR per cell and the means over the cells that have both."""
import collections
import json
import sys

E = 'benchmarks/explore/'
base = {}
for line in open(E + 'session19-ensemble.jsonl'):
    r = json.loads(line)
    base[r['cell']] = tuple(r['grid'])
for line in open(E + 'session19-posthoc-reset.jsonl'):
    r = json.loads(line)
    base.setdefault(r['cell'], tuple(r['delta50']))
arms = collections.defaultdict(list)
for line in open(E + 'session20.jsonl'):
    r = json.loads(line)
    b, a = r['before'], r['after']
    name = r['run'].split('/')[-1]
    cell = '-'.join(name.split('-')[:2])
    t = r['try'].replace('recipe=default,', '')
    if sys.argv[1:] and t not in sys.argv[1:]:
        continue
    arms[t].append((cell, (round(a['acc'] - b['acc'], 2), round(a['asr'], 2)), base.get(cell)))
for t, rows in arms.items():
    print('==', t)
    for c, x, bb in rows:
        print(f'  {c:15s} {x[0]:6.2f} / {x[1]:6.2f}   grid run {bb}')
    p = [(x, bb) for _, x, bb in rows if bb]
    if p:
        n = len(p)
        print(f'  mean over {n} cells: {sum(x[0] for x, _ in p) / n:.2f} / {sum(x[1] for x, _ in p) / n:.2f}'
              f'   grid run {sum(b[0] for _, b in p) / n:.2f} / {sum(b[1] for _, b in p) / n:.2f}')
