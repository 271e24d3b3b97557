"""Fit the zoo's ISSBA encoder as `nft bench` does for one seed and print fit_stats (NOTES.md §30).

    python benchmarks/explore/session26-issba-ramp.py SEED [RAMP_BY]

RAMP_BY: the attack's ``ramp_by`` (the latest step the image loss starts ramping in); omitted: None.
"""
import json
import sys
import time

from nft.attacks.base import fit_attack
from nft.bench import ModelSpec, RunOptions, attack_for, data_for

seed = int(sys.argv[1])
kwargs = {} if len(sys.argv) < 3 else {"ramp_by": int(sys.argv[2])}
spec = ModelSpec(attack="issba", seed=seed, arch_kwargs={"width": 16}, attack_kwargs=kwargs)
attack = attack_for(spec, data_for(spec))
t0 = time.time()
fit_attack(attack, data_for(spec), RunOptions().runtime(spec))
print(json.dumps({"seed": seed, **kwargs, "fit_stats": attack.fit_stats, "seconds": round(time.time() - t0, 1)}))
