"""Attack-zoo benchmark on mnist10k: every registered attack (and a benign model), 2 seeds.

    python benchmarks/attacks/run.py                  # train what is missing, then write results.md
    python benchmarks/attacks/run.py --attacks wanet  # just some attacks
    python benchmarks/attacks/run.py --report-only    # results.md from records.jsonl

Each cell is one `nft train` subprocess (CPU model: PreActResNet-18 --width 16, 1 thread, the
attack's default epochs), run sequentially. Its metrics are read back from the run directory's
manifest and appended to records.jsonl; results.md is made from the records only.
Targets (issue 3): ASR >= 90% (clean-label >= 80%), ACC within 1.5 points of benign, mean of 2 seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "records.jsonl")
CLEAN_LABEL = {"sig", "clb"}
RATES = {"sig": 0.08, "clb": 0.08}  # clean-label: 80% of the target class (ANP's label-consistent recipe)
MODES = {"trojan-all": ("trojan", "all2all"), "inputaware-all": ("inputaware", "all2all")}


def cells(names):
    out = []
    for n in names:
        attack, mode = MODES.get(n, (n, "all2one"))
        out.append((n, attack, mode))
    return out


def command(name, attack, mode, seed, out):
    cmd = [sys.executable, "-m", "nft", "train", "--dataset", "mnist10k", "--model", "preactresnet18", "--width", "16",
           "--seed", str(seed), "--threads", "1", "--no-progress", "--out", out, "--overwrite"]
    if attack != "benign":
        cmd += ["--attack", attack, "--label-mode", mode, "--poison-rate", str(RATES.get(attack, 0.1))]
    return cmd


def load_records():
    if not os.path.isfile(RECORDS):
        return []
    with open(RECORDS) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cell(name, attack, mode, seed, runs_dir):
    out = os.path.join(runs_dir, f"{name}-s{seed}")
    cmd = command(name, attack, mode, seed, out)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"name": name, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:]}
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    shown = ["nft"] + cmd[3:]
    shown[shown.index("--out") + 1] = f"runs/{name}-s{seed}"
    return {"name": name, "attack": attack, "mode": mode, "seed": seed, **m["metrics"],
            "train_seconds": m["train_seconds"], "wall_seconds": time.time() - t0, "epochs": m["train"]["epochs"],
            "poison_rate": m["train"]["poison_rate"], "command": shlex.join(shown)}


NOTES = """Notes
- Training seconds are wall-clock on a 2-core machine shared with other engineers' jobs (load average
  2-11 over the runs; a lone width-16 run takes ~40-60 s), so they compare only roughly.
- Rows named `x (...)` are earlier measured configurations kept as evidence for a changed default or rate:
  SIG and CLB at rate 0.1 poison the *whole* target class, so the model never sees a clean 0 and ACC
  drops ~10 points; at 0.05 (half the class) the clean half teaches the 0s and the backdoor is not
  learned (SIG 62.5%, CLB 0.7% ASR); the benchmark now uses 0.08 (80% of the target class, ANP's
  label-consistent recipe), which keeps ACC.
- SIG: trained with BB's delta 40/255 at 80% of the target class, ASR on test images with the same
  40/255 signal was 70.4 (row `sig (test delta 40/255)`). Barni et al. strengthen the signal at test
  time (the attacker controls the test input); re-evaluating that same seed-0 model with test amplitude
  51/64/77/80/102 (/255) gave ASR 87.6/93.4/94.7/95.0/92.4 (`benchmarks/attacks/explore.py eval`). The
  default `test_delta` is now 80/255 (twice the training signal); training is unchanged.
- CLB, first round (the previous default, row `clb (previous default: ...)`, missed: ASR 2.6 / 17.7
  on seeds 0-1 at rate 0.08). The victim learns the perturbed 0s from
  their shape and does not need the trigger. Tried on seed 0 (`benchmarks/attacks/explore.py train
  clb --set ...`): default (small-CNN surrogate, PGD 64/255): ASR 2.6. Adversarially trained small-CNN surrogate (PGD-AT at 64/255, 2 epochs): 0.4.
  Same-architecture surrogate (PreActResNet-18 w16, 4 epochs) with PGD at the customary MNIST budget
  0.3: 0.4, although those images fool an independently trained benign model 98.7% of the time
  (its accuracy on them 1.3%, vs 68% for the default's). Robust small CNN (PGD-AT 0.3, 5 epochs)
  with PGD 0.4: 0.1. ACC stayed 98.2-98.7 in all. Only when *every* 0 carries the trigger (rate 0.1,
  row above) does the trigger win (65.6), and then clean 0s are lost (ACC -10). Defaults unchanged;
  the surrogate options (`surrogate_arch`, `surrogate_adv_eps`) stay for other data sets.
- CLB, second round (seed 0 unless said; `explore.py train clb --rate 0.08 --set ...`, the rows
  `clb (...)`): the PGD perturbation itself is the shortcut on digits. On the default seed-0 model,
  non-target test digits with uniform +-64/255 noise and no trigger go to 0 98.7% of the time, the
  trigger alone 2.6% (seed 1: noise 1.8%, trigger 17.7%, noise + trigger 78%): black MNIST backgrounds
  make full-image PGD a feature only poisoned 0s carry. PGD confined to the foreground
  (`foreground_only`, pixels > 0) removes that (0.3%): ASR 4.3 / 38.3 (seeds 0/1), at eps 0.5: 3.5,
  at eps 1.0 with 100 steps: 4.7, eps 0.3 against a PGD-AT 0.3 surrogate: 4.6, 16 epochs: 5.6.
  The trigger adds ~6-11 logits to class 0 against a ~16-17 logit margin on clean digits. A
  pixel-space stand-in for the paper's GAN interpolation (`interp`: (1 - t) x + t x_other before
  PGD): t 0.3: 9.7, t 0.5: 0.3, t 0.3 without PGD: 1.3. ACC 98.5-99.1 in all; defaults unchanged.
- CLB, third round (seeds 0/1, `explore.py train clb --rate 0.08 --set ...`, the rows `clb (...)`):
  a PreActResNet-18 surrogate (width 16, 4 epochs, as the victim) with foreground-only PGD 0.5 gave
  84.3 / 41.0 (40 steps) and 64.8 / 63.3 (100 steps); at eps 1.0 (100 steps) 2.9 / 65.4. The 3 px
  corner squares added too few logits against the clean-digit margin. Corner squares of side 5
  (`size=5`, the same checkerboard scaled up, still in the empty MNIST margin) with the same PGD:
  79.8 / 86.8 (40 steps, ACC 97.65 / 98.30) and 90.7 / 99.2 (100 steps, ACC 98.90 / 98.60). The
  latter is now CLB's default on one-channel images (eps 0.5, 100 steps, `foreground_only`,
  PreActResNet-18 surrogate for 4 epochs, side 5 per 28 px); colour images keep the spec's recipe
  (16/255, 40 steps, small-CNN surrogate, side 3 per 32 px). The `clb` row is `nft train` with the
  new default: 95.6 / 87.8, ACC 98.05 / 98.75 (`train_surrogate` draws the surrogate's initial weights
  from the global RNG, which `nft train` has advanced by its model probe and explore.py has not,
  hence other numbers for the same configuration).
- BPP with the paper's 8 levels barely changes digits (ASR 0.3%).
- Input-aware now trains 24 epochs (its own `train_epochs`) with the pattern generator's Adam lr
  0.001 (`g_lr`; the official 0.01 stays for the mask net): ASR 93.8/98.1 all2one and 91.8/98.5
  all2all, ACC 98.8-99.3. Rows `inputaware (G lr 0.01, 8 epochs)` are the previous default (88.2 and
  69.9 mean). A diagnostic on those models (own mask with another image's pattern still fired the
  backdoor 43-63% of the time; cross-trigger accuracy 81-87) showed the classifier keyed on where the
  mask sits and had not learned to tell own triggers from cross ones; G at Adam 0.01 kept moving the
  pattern while the classifier's one-cycle lr decayed. G lr 0.001 alone: 91.5/88.1 all2one, 79.4
  all2all (seed 0); with 16 epochs 88.6, 24 epochs 91.8 (all2all, seed 0). The
  `explore.py train ... --epochs 24 --set g_lr=0.001` run gave exactly the `nft train` numbers.
  Earlier (G lr 0.01, 8 epochs): before the cross-partner fix (seed 0) 76.3, 16 epochs 74.6, all2all
  74.4. The cross samples drew
  their partner by a random permutation, so ~1 in 13 got its *own* pattern and mask under its true
  label, contradicting the backdoor; they now use a derangement (as the official second data loader
  does). With the fix, 16 epochs gave 72.1 (seed 0, `explore.py train inputaware --epochs 16`), not
  more. A stage 1 as long as the
  official 25 epochs (3125 steps of 64 pairs instead of 300) gave masks of the same size (1.27% of the
  pixels vs 1.3%; the per-pixel norm term keeps them small, as in the official loss) but more diverse
  ones (IoU between two images' masks 0.02 vs 0.06) and ASR 36.2 on seed 0 (row `inputaware (3125
  mask steps)`), so `mask_steps` stays 300. Feeding G and M 2x - 1 (the official code's MNIST
  normalization, mean 0.5 / std 0.5, with M's image distances on that scale) gave 73.6 on seed 0; not
  kept. Architecture, losses, mask lr 0.01, mask density 0.032,
  lambda_div 1 and p_attack = p_cross = 0.1 follow the official config.
- CLB's PGD (on 1-channel images eps 0.5, 100 steps, foreground only, against a separately trained
  PreActResNet-18 surrogate; the 0.1 row used 16/255 and the small-CNN surrogate).
- The badnets and blend rows (seeds 0 and 1) are runs of the same command made by the defense benchmark
  (`/work/cache/models`), imported from their manifests rather than retrained.
- Substitutes, stated in each attack's docstring: FBA is a fixed global style transform (no CycleGAN, no
  detoxification); ISSBA's encoder is a StegaStamp-lite trained from scratch in `fit`; TrojanNN uses a
  small-CNN surrogate and a square mask instead of the apple watermark; LF builds its low-pass UAP by
  signed-gradient steps instead of DeepFool; LIRA's eps is 0.05 in pixel space; CBA's contrastive term
  is on softmax outputs.
- ISSBA's trigger is *not* invisible on digits: PSNR 18.1 dB between clean and encoded mnist10k test
  images (seed 0; the spec's suggested check asks > 27 dB). With the image-loss weight raised from 10 to 100
  the encoder reached 34.8 dB but only 0.62 bit accuracy in its 800 steps; not tuned further (CPU time).
  The image loss starts ramping in only once the bits first reach 90 %, so the trigger's size hangs on a noisy
  crossing: on an AMD EPYC the five seeds' fits crossed at steps 331-786 and gave 6.5-23.3 dB (benchmarks/NOTES.md
  §30). With the ramp started by step 400 at the latest and 1,200 steps (`--set issba.steps=1200 --set
  issba.ramp_by=400`, session 27) the same five seeds give 21.6-28.9 dB (mean 26.0), ASR 100 on each (NOTES §31);
  the grid's ISSBA row now uses it (its records name these settings). Since session 28 these are the attack's
  defaults; `--set issba.steps=800 --set issba.ramp_by=null` gives the first schedule back.
- CBA (ASR on only 225 test composites, one per test "1", so one image is 0.44 points). At the
  shared 8 epochs with mixes drawn once (10% composites, 10% same-class mixes): 87.6. Drawing the
  mixes fresh in every batch as the official MixDataset does (45% same-class mixes): 86.2. Adding the
  official contrastive term (weight 1, margin 1) on raw logits: ASR 95.6 but ACC 70.3 (its unbounded
  pull term fights CE); on softmax outputs: ASR 87.6, ACC 97.65. The same at 16 epochs (the official
  trains 50): ASR 90.2/95.1 over seeds 0-1, ACC 98.5/98.2; CBA's own default is now 16 epochs.
  Misses are mostly composites predicted as B (digit 2): when the A half of a thin "1" is nearly
  empty the composite is just half a 2; even training composites reach only ~94% at 16 epochs.
- A seed missing from a row was not run (time); a mean over one seed is marked by its single bracket value."""


def report(records):
    by = {}
    for r in records:
        if "error" not in r:
            by.setdefault(r["name"], {})[r["seed"]] = r  # the latest record of each (name, seed) wins
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    benign = list(by.get("benign", {}).values())
    acc0 = mean(benign, "acc") if benign else float("nan")
    lines = ["# Attack zoo on mnist10k (PreActResNet-18, width 16, CPU)", "",
             "Mean over seeds (the per-seed values in brackets). Made by `benchmarks/attacks/run.py` from",
             "`records.jsonl`. Targets: ASR >= 90% (clean-label SIG/CLB >= 80%) and ACC within 1.5 points of",
             f"the benign model (benign ACC {acc0:.2f}). ASR/RA on triggered non-target test images",
             "(all2all: every test image; CBA: A+B composites). Every command is",
             "`nft train --dataset mnist10k --model preactresnet18 --width 16 --threads 1 --seed S --out DIR` plus the",
             "flags in the last column.", "",
             "| attack | mode | rate | epochs | ACC | ASR | RA | train s | target met | flags |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(by, key=lambda n: (n != "benign", n)):
        rs = [by[name][s] for s in sorted(by[name])]
        acc, sec = mean(rs, "acc"), mean(rs, "train_seconds")
        each = lambda k: "/".join(f"{r[k]:.1f}" for r in rs)  # noqa: E731
        if name == "benign":
            asr = ra = "-"
            ok = "-"
        else:
            a, ra_ = mean(rs, "asr"), mean(rs, "ra")
            need = 80 if rs[0]["attack"] in CLEAN_LABEL else 90
            ok = "yes" if a >= need and acc >= acc0 - 1.5 else f"**no** (ASR {a:.1f} vs {need}, dACC {acc - acc0:+.2f})"
            asr, ra = f"{a:.2f} ({each('asr')})", f"{ra_:.2f} ({each('ra')})"
        cmd = rs[0]["command"]
        flags = cmd[cmd.index("--attack"):] if "--attack" in cmd else "(benign)"
        flags = flags.replace(" --label-mode all2one", "")
        lines.append(f"| {name} | {rs[0]['mode']} | {rs[0]['poison_rate']} | {rs[0]['epochs']:g} | {acc:.2f} ({each('acc')}) "
                     f"| {asr} | {ra} | {sec:.0f} | {ok} | `{flags}` |")
    lines += ["", NOTES]
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    from nft.attacks import list_attacks

    p = argparse.ArgumentParser()
    p.add_argument("--attacks", nargs="*", default=None, help="default: benign + every attack (+ all2all variants)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--runs-dir", default=os.environ.get("NFT_ATTACK_RUNS", "/tmp/nft-attack-runs"))
    p.add_argument("--force", action="store_true", help="retrain cells that already have a record")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        names = args.attacks or (["benign"] + list_attacks() + sorted(MODES))
        done = {(r["name"], r["seed"]) for r in load_records() if "error" not in r}
        for seed in args.seeds:
            for name, attack, mode in cells(names):
                if (name, seed) in done and not args.force:
                    continue
                rec = run_cell(name, attack, mode, seed, args.runs_dir)
                print(json.dumps(rec), flush=True)
                with open(RECORDS, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    report(load_records())


if __name__ == "__main__":
    main()
