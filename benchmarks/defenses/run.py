"""Baseline defenses beside NFT on the BadNets and Blend mnist10k models (issue 4).

Every cell is one `nft purify` command (printed in the records), run as its own process so that
its seconds and peak memory are its own:

    nft purify /work/cache/models/{attack}-w16-s{seed} --defense D [--recipe R] --per-class 50 \
        --seed {seed} --clean-seed {seed} --threads 1 --no-progress --out DIR --overwrite

then this driver evaluates the purified model (ACC on the 10k test set; ASR and RA on the 9k
triggered non-target test images) and appends one JSON line to --records. Resumable: cells already
in the records are skipped. `--table-only` rewrites results.md from the records.

    python benchmarks/defenses/run.py                      # all cells, then results.md
    python benchmarks/defenses/run.py --table-only
    python benchmarks/defenses/run.py --grid benchmarks/results/mnist10k --out benchmarks/defenses/grid.md

``--grid DIR`` writes the same table from the records of an `nft bench` results directory instead
(its models, clean sets and seeds; cells run by the bench, one process per cell).

Models: PreActResNet-18 width 16, 10% poison, target 0, made by the lead with
    nft train --dataset mnist10k --model preactresnet18 --width 16 --attack ATTACK --poison-rate 0.1 --seed SEED
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

DEFENSES = ["clp", "fst", "nad", "rnp", "nft:paper", "nft:default", "ft", "fp", "ibau", "awm", "ftsam", "anp"]
HERE = os.path.dirname(os.path.abspath(__file__))


def command(run, defense, seed, out, per_class, threads):
    name, _, recipe = defense.partition(":")
    cmd = [sys.executable, "-m", "nft", "purify", run, "--defense", name, "--per-class", str(per_class),
           "--seed", str(seed), "--clean-seed", str(seed), "--threads", str(threads), "--no-progress",
           "--device", "cpu", "--out", out, "--overwrite"]
    if recipe:
        cmd[7:7] = ["--recipe", recipe]
    return cmd


def load_records(path):
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from an interrupted run
    return out


def run_cells(a):
    from nft.evaluate import evaluate, poisoned_test_set
    from nft.io import load_model
    from nft.runs import attack_from_run, dataset_of
    from nft.runtime import Runtime

    torch.set_num_threads(a.threads)
    done = {(r["attack"], r["seed"], r["defense"]) for r in load_records(a.records)}
    rt = Runtime(device="cpu", progress=False, threads=a.threads)
    cache = {}

    def model_of(attack_name, seed):  # the backdoored model, its test sets and its numbers before defense
        if (attack_name, seed) not in cache:
            run = os.path.join(a.models, f"{attack_name}-w16-s{seed}")
            model, man = load_model(run)
            data = dataset_of(man)
            pois = poisoned_test_set(data.test, attack_from_run(run, man))
            cache[(attack_name, seed)] = run, data, pois, evaluate(model, data.test, runtime=rt, poisoned=pois)
        return cache[(attack_name, seed)]

    # seed by seed, defense by defense (cheapest first), both attacks: whole seed-0 rows finish first
    for seed in a.seeds:
        for d in a.defenses:
            for attack_name in a.attacks:
                if (attack_name, seed, d) in done:
                    continue
                run, data, pois, before = model_of(attack_name, seed)
                out = os.path.join(a.work, f"{attack_name}-s{seed}-{d.replace(':', '-')}")
                cmd = command(run, d, seed, out, a.per_class, a.threads)
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                rec = {"attack": attack_name, "seed": seed, "defense": d, "per_class": a.per_class, "before": before,
                       "command": " ".join(["nft"] + cmd[3:]), "wall_seconds": wall}
                if proc.returncode != 0:
                    rec["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                else:
                    metrics = json.load(open(os.path.join(out, "metrics.json")))
                    hist = json.load(open(os.path.join(out, "history.json")))
                    pm, _ = load_model(out)
                    rec.update(after=evaluate(pm, data.test, runtime=rt, poisoned=pois), seconds=metrics["seconds"],
                               peak_mb=metrics["peak_mb"], clean_images=metrics["clean_images"],
                               extras={k: v for k, v in hist["extras"].items()
                                       if k in ("config", "pruned", "neurons", "channels", "stopped",
                                                "unlearn_epochs_run", "clean_acc_unlearned", "clean_acc_recovered",
                                                "rounds", "masks_below_0.5", "attention_layers", "val_acc_unpruned")})
                with open(a.records, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps({k: rec.get(k) for k in ("attack", "seed", "defense", "after", "seconds", "error")}),
                      flush=True)
                write_table(a)


LABEL = {"nft:default": "NFT (default recipe)", "nft:paper": "NFT (paper recipe)", "ft": "FT", "fp": "FP",
         "nad": "NAD", "anp": "ANP", "ibau": "I-BAU", "rnp": "RNP", "ftsam": "FT-SAM", "awm": "AWM",
         "clp": "CLP (data-free)", "fst": "FST", "sau": "SAU"}


def verdict(asr, drop):
    """Removed = ASR <= 10% with an ACC drop <= 5 points (our yardstick, stated in the notes)."""
    fails = ([f"ASR stays {asr:.0f}%"] if asr > 10 else []) + ([f"ACC falls {drop:.0f} pts"] if drop > 5 else [])
    return "removed" if not fails else "**fails**: " + ", ".join(fails)


def grid_records(results: str, per_class: int) -> list[dict]:
    """`nft bench` records of one results directory, in this driver's record shape."""
    out = []
    for name in sorted(os.listdir(os.path.join(results, "records"))):
        r = json.load(open(os.path.join(results, "records", name)))
        if r.get("defense") in (None, "none") or r.get("clean_per_class") != per_class:
            continue
        d = r["defense"].replace("nft_", "nft:") if r["defense"].startswith("nft_") else r["defense"]
        out.append({"attack": r["attack"], "seed": r["seed"], "defense": d, "before": r["before"],
                    "after": {k: r[k] for k in ("acc", "asr", "ra")}, "seconds": r["seconds"],
                    "peak_mb": r["peak_mb"]})
    return out


def write_table(a):
    recs = grid_records(a.grid, a.per_class) if a.grid else [r for r in load_records(a.records) if "after" in r]
    errs = [] if a.grid else [r for r in load_records(a.records) if "error" in r]
    m = statistics.mean
    intro = [f"Cells from the `nft bench` records in `{a.grid}` (its README has the commands): models trained "
             f"by the bench, 50 clean images per class from the held-out pool, ACC on the 2,000 test images, ASR/RA "
             f"on the 1,800 triggered non-target ones. Seconds and peak memory are the bench's per cell, on a "
             f"2-core machine running 2-3 cells at once: compare them within this table only. Written by "
             f"`python benchmarks/defenses/run.py --grid {a.grid} --out {os.path.relpath(a.out)}`.", ""] if a.grid else [
             f"50 clean images per class (500, from the held-out pool), CPU, 1 thread. Each number is the mean over "
             f"the seeds listed (model seed s, clean-set pick s, defense seed s); per-seed values in records.jsonl. "
             f"ACC on the 10k test set; ASR/RA on the 9k triggered non-target test images. Seconds and peak memory "
             f"(RSS above the start) are those of `defend()` in its own `nft purify` process, on a shared, "
             f"oversubscribed 2-core machine: compare them within this table only.",
             "",
             "Command per cell: `nft purify /work/cache/models/{attack}-w16-s{seed} --defense D [--recipe R] "
             "--per-class 50 --seed {seed} --clean-seed {seed} --threads 1 --no-progress --device cpu --out DIR`; "
             "driver: `python benchmarks/defenses/run.py` (resumable; `--table-only` rewrites this file).",
             ""]
    lines = ["# Baseline defenses beside NFT: mnist10k, PreActResNet-18 (width 16), 10% poison, target 0",
             "", *intro]
    for attack_name in a.attacks:
        lines += [f"## {attack_name}", "",
                  "| defense | seeds | ACC | ASR | RA | ACC drop | seconds | peak MB | verdict |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        rs0 = [r for r in recs if r["attack"] == attack_name]
        for seed, b in sorted({r["seed"]: r["before"] for r in rs0}.items()):
            lines.append(f"| no defense (seed {seed}) | {seed} | {b['acc']:.2f} | {b['asr']:.2f} | {b['ra']:.2f} | | | | |")
        for d in a.defenses:
            rs = sorted((r for r in rs0 if r["defense"] == d), key=lambda r: r["seed"])
            if not rs:
                lines.append(f"| {LABEL.get(d, d)} | not run (see notes) | | | | | | | |")
                continue
            acc = m([r["after"]["acc"] for r in rs])
            drop = m([r["before"]["acc"] - r["after"]["acc"] for r in rs])
            asr = m([r["after"]["asr"] for r in rs])
            lines.append(f"| {LABEL.get(d, d)} | {','.join(str(r['seed']) for r in rs)} | {acc:.2f} | "
                         f"{m([r['after']['asr'] for r in rs]):.2f} | {m([r['after']['ra'] for r in rs]):.2f} | "
                         f"{drop:.2f} | {m([r['seconds'] for r in rs]):.0f} | {m([r['peak_mb'] for r in rs]):.0f} | "
                         f"{verdict(asr, drop)} |")
        lines.append("")
    if errs:
        lines += ["## Failed cells", ""] + [f"- {r['attack']} s{r['seed']} {r['defense']}: {r['error']}" for r in errs]
        lines.append("")
    notes = os.path.join(HERE, "notes.md")
    if os.path.exists(notes):
        lines += [open(notes).read().rstrip(), ""]
    with open(a.out, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/work/cache/models")
    ap.add_argument("--records", default=os.path.join(HERE, "records.jsonl"))
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    ap.add_argument("--work", default="/tmp/nft-defenses-bench", help="where the purified models go")
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blend"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--defenses", nargs="+", default=DEFENSES)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--grid", help="write the table from this `nft bench` results directory's records")
    a = ap.parse_args()
    if not a.table_only and not a.grid:
        os.makedirs(a.work, exist_ok=True)
        run_cells(a)
    write_table(a)
    print(open(a.out).read())


if __name__ == "__main__":
    main()
