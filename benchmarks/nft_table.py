"""The issue-2 table: NFT `default` and `paper` recipes on BadNets and Blend mnist10k models,
3 seeds, 50 and 1 clean images per class. Resumable: one JSON line per cell in --records; cells
already there are skipped. Then writes the Markdown table.

    python benchmarks/nft_table.py --models /work/cache/models --records benchmarks/nft_table.jsonl \
        --out benchmarks/nft_table.md

Models: run directories `{attack}-w16-s{seed}` made with
    nft train --dataset mnist10k --model preactresnet18 --width 16 --attack ATTACK --poison-rate 0.1 --seed SEED
(10% poison, target 0, 8 epochs; the defender's clean images come from the held-out pool, never trained on).
The clean set of seed s is picked with seed s.
"""
import argparse
import json
import os
import statistics
import time

import torch

from nft.evaluate import evaluate, poisoned_test_set
from nft.io import load_model
from dataclasses import asdict

from nft.purify import NFTConfig, for_clean_set, purify, recipe
from nft.runs import attack_from_run, clean_set, dataset_of
from nft.runtime import Runtime

from halves import halves

HEADER = """# NFT recipes on mnist10k (issue 2 targets)

PreActResNet-18 width 16, 10% poison, target 0, models `/work/cache/models/{attack}-w16-s{seed}` made by
`nft train --dataset mnist10k --model preactresnet18 --width 16 --attack A --poison-rate 0.1 --seed S --threads 1`.
Clean images from the held-out pool (never trained on), picked per seed. Means over the seeds listed;
per-seed values in brackets; records in `nft_table.jsonl`. Made by
`python benchmarks/nft_table.py --threads 1` (resumable; `--table-only` rewrites this file). Seconds
are wall-clock on a 2-core machine shared with other jobs (load 2-11), comparable only roughly.
The `paper` cells ran in session 2 (load 3-4), the `default` cells in session 4 (beside 2-3 other jobs, load about 3).
Rows that are missing have not been run yet. Only records made with the recipe as defined now are
counted (earlier ones stay in the .jsonl as history).

Since session 3 the targets are judged on the **report half** of the test set (1,002 images,
benchmarks/halves.py): recipe settings are compared on the other (dev) half only, so the half that
judges them never took part in choosing them. Records from before that split have only whole-test
numbers; their rows say "full test". The "full test" column gives every row on all 2,000 images.

"""

DEFAULTS = json.loads(json.dumps(asdict(NFTConfig())))


def current(rec: dict) -> bool:
    """Was this record made with the recipe as it is defined now? Settings added to NFTConfig after
    the record was written count as unchanged when the recipe leaves them at their default."""
    now = json.loads(json.dumps(asdict(for_clean_set(recipe(rec["recipe"]), rec["per_class"]))))
    then = rec.get("config", {})
    skip = {"log_every", "eval_every"}
    return all(then.get(k, DEFAULTS[k]) == v for k, v in now.items() if k not in skip)


TARGETS = {50: (2.0, 1.0), 1: (5.0, 2.0)}  # per-class -> (max ASR %, max ACC drop in points)


def run_cells(a):
    done = set()
    if os.path.exists(a.records):
        with open(a.records) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from an interrupted run
                if current(r):
                    done.add((r["attack"], r["seed"], r["per_class"], r["recipe"]))
    rt = Runtime(device="cpu", seed=0, progress=False)
    for attack_name in a.attacks:
        for seed in a.seeds:
            run = os.path.join(a.models, f"{attack_name}-w16-s{seed}")
            todo = [(pc, rc) for pc in a.per_class for rc in a.recipes if (attack_name, seed, pc, rc) not in done]
            if not todo:
                continue
            model, man = load_model(run)
            data = dataset_of(man)
            attack = attack_from_run(run, man)
            pois = poisoned_test_set(data.test, attack)
            before = evaluate(model, data.test, runtime=rt, poisoned=pois)
            report = halves(data.test, data.num_classes)[1]
            report_pois = poisoned_test_set(report, attack)
            before_report = evaluate(model, report, runtime=rt, poisoned=report_pois)
            for pc, rc in todo:
                clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=pc, seed=seed)
                rt = Runtime(device="cpu", seed=seed, progress=False)
                t0 = time.perf_counter()
                pm, _, _, ex = purify(model, clean, recipe(rc), rt)
                secs = time.perf_counter() - t0
                after = evaluate(pm, data.test, runtime=rt, poisoned=pois)
                rec = {"attack": attack_name, "seed": seed, "per_class": pc, "recipe": rc, "before": before,
                       "after": after, "before_report": before_report,
                       "after_report": evaluate(pm, report, runtime=rt, poisoned=report_pois), "seconds": secs, "config": ex["config"], "run": run}
                with open(a.records, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                print(json.dumps({k: rec[k] for k in ("attack", "seed", "per_class", "recipe", "after", "seconds")}),
                      flush=True)


def table(a):
    recs = [r for r in (json.loads(line) for line in open(a.records) if line.strip()) if current(r)]
    lines = [
        "| attack | clean/class | recipe | seeds | judged on | ACC before | ACC after (per seed) | ACC drop | ASR before | "
        "ASR after (per seed) | target (ASR, drop) | met | full test: drop / ASR | seconds/run |",
        "|---|---:|---|---|---|---:|---|---:|---:|---|---|---|---|---:|",
    ]
    for attack_name in a.attacks:
        for pc in a.per_class:
            for rc in a.recipes:
                rs = sorted((r for r in recs if (r["attack"], r["per_class"], r["recipe"]) == (attack_name, pc, rc)),
                            key=lambda r: r["seed"])
                if not rs:
                    continue
                m = lambda xs: statistics.mean(xs)  # noqa: E731
                half = all("after_report" in r for r in rs)  # judged on the report half (benchmarks/halves.py)
                b, af = ("before_report", "after_report") if half else ("before", "after")
                acc_b, acc_a = m([r[b]["acc"] for r in rs]), m([r[af]["acc"] for r in rs])
                asr_b, asr_a = m([r[b]["asr"] for r in rs]), m([r[af]["asr"] for r in rs])
                drop = acc_b - acc_a
                full = (f"{m([r['before']['acc'] - r['after']['acc'] for r in rs]):.2f} / "
                        f"{m([r['after']['asr'] for r in rs]):.2f}")
                t_asr, t_drop = TARGETS.get(pc, (None, None))
                met = "yes" if t_asr is not None and asr_a <= t_asr and drop <= t_drop else "**no**"
                accs = ", ".join(f"{r[af]['acc']:.2f}" for r in rs)
                asrs = ", ".join(f"{r[af]['asr']:.2f}" for r in rs)
                seeds = ",".join(str(r["seed"]) for r in rs)
                secs = m([r["seconds"] for r in rs])
                lines.append(
                    f"| {attack_name} | {pc} | {rc} | {seeds} | {'report half' if half else 'full test'} | {acc_b:.2f} | "
                    f"{acc_a:.2f} ({accs}) | {drop:.2f} | {asr_b:.2f} | {asr_a:.2f} ({asrs}) | <= {t_asr}, <= {t_drop} | "
                    f"{met} | {full} | {secs:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/work/cache/models")
    ap.add_argument("--records", default="benchmarks/nft_table.jsonl")
    ap.add_argument("--out", default="benchmarks/nft_table.md")
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blend"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--per-class", nargs="+", type=int, default=[50, 1])
    ap.add_argument("--recipes", nargs="+", default=["default", "paper"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.table_only:
        run_cells(a)
    md = HEADER + table(a)
    with open(a.out, "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
