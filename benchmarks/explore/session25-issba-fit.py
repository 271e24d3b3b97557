"""Re-fit an ISSBA model's encoder exactly as `nft bench` does and print its fit_stats (NOTES.md §29).

    python benchmarks/explore/session25-issba-fit.py runs/g/models/issba-s2-15dd6fb3b7a3

Also prints the trigger residual's RMS per pixel on 300 test images of the model's own saved encoder.
"""
import json
import sys
import time

from nft.attacks.base import fit_attack
from nft.bench import ModelSpec, RunOptions, attack_for, data_for
from nft.data.core import to_float
from nft.io import load_model
from nft.runs import attack_from_run

run = sys.argv[1]
manifest = json.load(open(f"{run}/manifest.json"))
spec = ModelSpec(**manifest["bench_model"])
data = data_for(spec)
_, man = load_model(run)
saved = attack_from_run(run, man)
x, y = to_float(data.test.x[:300]), data.test.y[:300]
out = saved.apply(x, y)
r = ((out[0] if isinstance(out, tuple) else out) - x).flatten(1)
print(json.dumps({"run": run, "residual_rms": float(r.pow(2).mean(1).sqrt().mean()), "mean_abs": float(r.abs().mean())}))
attack = attack_for(spec, data)
t0 = time.time()
fit_attack(attack, data, RunOptions().runtime(spec))
print(json.dumps({"run": run, "fit_stats": attack.fit_stats, "seconds": round(time.time() - t0, 1)}))
