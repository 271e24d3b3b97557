"""Run nft's RNP (defend_rnp) on a cached model with config overrides; print the clean-set trace and
the dev-half ACC/ASR. usage: python benchmarks/defenses/rnp_diag.py RUN [field=value ...]"""
import os, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nft.io import load_model
from nft.runs import attack_from_run, clean_set, dataset_of
from nft.runtime import Runtime
from nft.evaluate import evaluate, poisoned_test_set
from nft.defenses.rnp import RNPConfig, defend_rnp
from halves import halves
torch.set_num_threads(1)
run = sys.argv[1]
model, man = load_model(run)
data = dataset_of(man); attack = attack_from_run(run, man)
clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=50, seed=0)
rt = Runtime(device="cpu", seed=0, progress=False)
def conv(k, v):
    t = type(getattr(RNPConfig, k))
    return v if t is str else (None if v == "None" else t(v))
over = {k: conv(k, v) for k, v in (a.split("=") for a in sys.argv[2:])}
t0 = time.time()
out = defend_rnp(model, clean, over, rt)
ex = out.extras
print("cfg", over, "secs", round(time.time() - t0, 1))
print("epoch acc", [round(a, 2) for a in ex["unlearn_train_acc"]], "steps", ex["unlearn_steps_run"],
      "batch acc", [round(a, 2) for a in ex["unlearn_batch_acc"]])
print("clean acc before/unlearned/recovered", ex["clean_acc_before"], ex["clean_acc_unlearned"], ex["clean_acc_recovered"])
allm = torch.cat([v.flatten() for v in ex["mask_state"].values()])
print("mask quantiles", [round(float(q), 2) for q in allm.quantile(torch.tensor([0.05, .25, .5, .75, .95]))],
      "below thr", ex["below_threshold"])
print("sweep", [(s["pruned"], round(s["clean_acc"], 3)) for s in ex["prune_sweep"]])
print("chosen", ex["pruned"], "max mask pruned", ex["prune_mask_max"], "clean acc pruned", ex["clean_acc_pruned"], "floor", ex["clean_acc_floor"])
dev = halves(data.test, data.num_classes)[0]
print("DEV", evaluate(out.model.eval(), dev, runtime=rt, poisoned=poisoned_test_set(dev, attack)))
