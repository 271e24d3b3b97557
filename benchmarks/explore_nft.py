"""Try NFT settings on saved run directories; one JSON line per (run, setting) on stdout.

    python benchmarks/explore_nft.py RUN_DIR [RUN_DIR ...] --per-class 50 \
        --try 'recipe=paper' --try 'recipe=default,steps=300' ...

Each --try is comma-separated key=value NFTConfig overrides (values parsed as JSON).
Evaluation is on the dev half of the test set by default (benchmarks/halves.py): the other half is
where benchmarks/nft_table.py judges the targets, so recipe choices are never scored on the images
that judge them. ``--eval pool`` uses the defender's held-out pool minus the picked clean images
(session 2's dev split: only 300 images at 50/class); ``--eval test`` the whole test set.
``--runtime-seeds 0 1 2`` repeats every setting with those runtime seeds (same model, same clean
images): one-shot outcomes swing with it as much as with the recipe.
"""
import argparse
import copy
import json
import time
from dataclasses import replace

import torch

from nft.evaluate import evaluate, poisoned_test_set
from nft.io import load_model
from nft.masks import attach
from nft.purify import purify, recipe, reestimate_bn
from nft.runs import attack_from_run, clean_set, dataset_of
from nft.commands.purify import parse_sets
from nft.data.core import ImageData, stratified_pick
from nft.runtime import Runtime
from nft.searches import universal_probe

from halves import halves


def parse(s):
    """'a=1,b={"c":1,"d":2}' -> overrides; commas inside brackets or braces belong to the value."""
    items, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "[{" and 1 or (ch in "]}" and -1 or 0)
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return parse_sets([kv for kv in items + [cur] if kv])


def reset_masks(original, ex, tau, clean, cfg, rt):
    """The original model with NFT's masks, every mask above ``tau`` set back to 1, folded; BN moved
    by the masks' delta."""
    m = copy.deepcopy(original)
    masks = attach(m, cfg.where)
    state = {k: torch.where(v > tau, torch.ones_like(v), v) for k, v in ex["mask_state"].items()}
    masks.load_state_dict(state)
    masks.fold()
    reestimate_bn(original, m, clean, replace(cfg, bn_recal=50, bn_recal_mode="delta"), rt)
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--try", dest="tries", action="append", required=True)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--clean-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--curve", action="store_true", help="evaluate every eval_every steps")
    ap.add_argument("--eval", choices=("dev", "pool", "test"), default="dev")
    ap.add_argument("--runtime-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--bn-variants", type=int, default=0, metavar="K",
                    help="also report the purified model with BN statistics re-estimated from K plain clean "
                         "batches ('replace') and moved by the masks' delta ('delta'), from the same run")
    ap.add_argument("--reset-variants", nargs="*", type=float, default=[], metavar="TAU",
                    help="also report the purified masks with every mask above TAU set back to 1 (only the "
                         "channels NFT closed stay closed), BN moved by the masks' delta from 50 batches")
    ap.add_argument("--average-masks", action="store_true",
                    help="also report, per setting, the masks averaged over the runtime seeds' runs (folded into "
                         "the original model, BN moved by the masks' delta from 50 batches)")
    ap.add_argument("--probe", type=int, default=0, metavar="STEPS",
                    help="also report nft.searches.universal_probe (STEPS steps, eps 0.15, on the clean set) on the model "
                         "before and after: how far one searched universal delta sends the clean images to one class")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rt = Runtime(device="cpu", seed=0, progress=False)
    for run in a.runs:
        model, man = load_model(run)
        data = dataset_of(man)
        attack = attack_from_run(run, man)
        clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=a.per_class, seed=a.clean_seed)
        if a.eval == "dev":
            target = halves(data.test, data.num_classes)[0]
        elif a.eval == "pool":
            keep = torch.ones(len(data.heldout), dtype=torch.bool)
            keep[stratified_pick(data.heldout.y, data.num_classes, a.per_class, None, a.clean_seed)] = False
            target = ImageData(data.heldout.x[keep], data.heldout.y[keep])
        else:
            target = data.test
        pois = poisoned_test_set(target, attack)
        before = evaluate(model, target, runtime=rt, poisoned=pois)
        probe = (lambda m, rs: universal_probe(m, clean.x, clean.y, 0.15, 0.25, a.probe, 64,
                                               torch.Generator().manual_seed(707 + rs))) if a.probe else None
        if probe:
            before = {**before, "probe": probe(model, 0)}
        states: dict[str, list] = {}
        for t, rs in [(t, rs) for t in a.tries for rs in a.runtime_seeds]:
            rt = Runtime(device="cpu", seed=rs, progress=False)
            over = parse(t)
            cfg = recipe(over.pop("recipe", "default"), **over)
            mon = (lambda m: evaluate(m, target, runtime=rt, poisoned=pois)) if a.curve else None
            t0 = time.perf_counter()
            pm, masks, hist, ex = purify(model, clean, cfg, rt, mon)
            secs = time.perf_counter() - t0
            after = evaluate(pm, target, runtime=rt, poisoned=pois)
            rec = {"run": run, "try": t, "runtime_seed": rs, "per_class": a.per_class, "eval": a.eval, "eval_n": len(target), "before": before, "after": after,
                   "seconds": round(secs, 1), "masks_below_0.5": ex["masks_below_0.5"], "num_masks": ex["num_masks"],
                   "final_loss": hist[-1].get("loss") if hist else None,
                   **{k: ex[k] for k in ("composite_probe", "patch_probe", "recovery_checks", "target_probe", "search_target") if k in ex}}
            if probe:
                rec["probe"] = probe(pm, rs)
            if a.bn_variants:
                for mode in ("replace", "delta"):
                    vm = copy.deepcopy(pm)
                    reestimate_bn(model, vm, clean, replace(cfg, bn_recal=a.bn_variants, bn_recal_mode=mode), rt)
                    vm.eval()
                    rec[f"after_bn_{mode}"] = evaluate(vm, target, runtime=rt, poisoned=pois)
            for tau in a.reset_variants:
                rec[f"after_reset_{tau:g}"] = evaluate(reset_masks(model, ex, tau, clean, cfg, rt), target, runtime=rt,
                                                       poisoned=pois)
            if a.curve:
                rec["curve"] = [(h["step"], round(h["acc"], 2), round(h["asr"], 2)) for h in hist if "asr" in h]
            print(json.dumps(rec), flush=True)
            states.setdefault(t, []).append((ex, cfg, secs))
            if a.average_masks and len(states[t]) == len(a.runtime_seeds) > 1:
                runs = states[t]
                keys = runs[0][0]["mask_state"]
                mean = {k: torch.stack([r[0]["mask_state"][k] for r in runs]).mean(0) for k in keys}
                am = reset_masks(model, {"mask_state": mean}, 2.0, clean, cfg, rt)  # 2.0: no mask is reset
                print(json.dumps({"run": run, "try": t, "runtime_seed": "mean of " + " ".join(map(str, a.runtime_seeds)),
                                  "per_class": a.per_class, "eval": a.eval, "eval_n": len(target), "before": before,
                                  "after": evaluate(am, target, runtime=rt, poisoned=pois),
                                  "seconds": round(sum(r[2] for r in runs), 1)}), flush=True)


if __name__ == "__main__":
    main()
