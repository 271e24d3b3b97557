"""Time defenses against NFT `default` on the same model, clean set and process: a ratio, not a timing.

    python benchmarks/timing.py MODEL_DIR --defenses nft:default,ibau,ftsam,awm --rounds 2 \
        --threads 1 --out benchmarks/results/mnist10k/timing/ATTACK-sSEED.json

``nft report RESULTS`` reads ``RESULTS/timing/*.json`` into its claims table ("less CPU time than X, one process").

Grid seconds (`nft bench`) are wall-clock on a shared 2-core machine, so they compare only within
one batch of cells. Here every defense runs ``--rounds`` times, in alternating order (A B C, C B A,
...), one after the other in one process with the same threads, and the table gives each one's median
seconds and its ratio to NFT `default`'s, wall-clock and CPU time (``time.process_time``: with one thread, a
defense's own compute, which another job on the other core inflates less). ACC/ASR are printed to show each run did its job.
"""
import argparse
import json
import os
import statistics
import time

import torch

from nft.defenses import get_defense
from nft.evaluate import evaluate, poisoned_test_set
from nft.io import load_model
from nft.records import parse_defense
from nft.runs import attack_from_run, clean_set, dataset_of
from nft.runtime import Runtime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--defenses", default="nft:default,ibau,ftsam,awm")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the runs and the table")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, man = load_model(a.model)
    data = dataset_of(man)
    attack = attack_from_run(a.model, man)
    clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=a.per_class, seed=0)
    pois = poisoned_test_set(data.test, attack)
    names = [d.strip() for d in a.defenses.split(",") if d.strip()]
    runs = []
    for r in range(a.rounds):
        for d in (names if r % 2 == 0 else names[::-1]):
            name, variant = parse_defense(d)
            rt = Runtime(device="cpu", seed=0, progress=False, threads=a.threads)
            rt.seed_everything()
            t0, c0 = time.perf_counter(), time.process_time()
            res = get_defense(name)(model, clean, {"recipe": variant} if variant else {}, rt)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            m = evaluate(res.model, data.test, runtime=rt, poisoned=pois)
            runs.append({"defense": d, "round": r, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2), "acc": m["acc"], "asr": m["asr"]})
            print(json.dumps(runs[-1]), flush=True)
    med = {d: statistics.median(x["seconds"] for x in runs if x["defense"] == d) for d in names}
    cpu = {d: statistics.median(x["cpu_seconds"] for x in runs if x["defense"] == d) for d in names}
    ref, cref = med[names[0]], cpu[names[0]]
    table = ["| defense | median seconds | ratio to " + names[0] + " | median CPU seconds | CPU ratio |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {d} | {med[d]:.1f} | {med[d] / ref:.2f} | {cpu[d]:.1f} | {cpu[d] / cref:.2f} |" for d in names]
    print("\n".join(table))
    if a.out:
        spec = man.get("bench_model") or {}
        where = {"dataset": spec.get("dataset"), "model": man.get("arch"), "model_kwargs": man.get("arch_kwargs") or {},
                 "attack": spec.get("attack"), "seed": spec.get("seed"), "per_class": a.per_class}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({**where, "model_dir": a.model, "threads": a.threads, "rounds": a.rounds, "runs": runs, "median": med, "median_cpu": cpu,
                       "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
