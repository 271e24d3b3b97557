"""nft report: the table arithmetic on hand-made records, and the files a report writes."""
import csv
import io
import json
import os

import pytest

from nft.records import BENIGN, NO_DEFENSE, write_record
from nft.report import avg_drop, build_report, fmt, group, mean_std, sections, table1


def rec(attack, defense, seed, acc, asr, n=50, **kw):
    cfg = {"model": {"dataset": "toy", "arch": "m", "arch_kwargs": {}, "attack": attack, "seed": seed,
                     "poison_rate": 0.1, "target": 0, "label_mode": "all2one", "epochs": 1, "batch_size": 8,
                     "lr": 0.1, "subset_train": None, "subset_test": None},
           "defense": defense, "clean_per_class": n}
    r = {"schema": 1, "cell_id": f"{attack}-{defense}-{n}-{seed}", "dataset": "toy", "model": "m",
         "model_kwargs": {}, "attack": attack, "defense": defense, "seed": seed,
         "clean_per_class": None if defense == NO_DEFENSE else n,
         "clean_images": 0 if defense == NO_DEFENSE else 10 * n,
         "acc": acc, "asr": None if attack == BENIGN else asr, "ra": None if attack == BENIGN else 100 - asr - 1,
         "der": None, "before": {}, "seconds": None if defense == NO_DEFENSE else 10.0 + seed, "peak_mb": 5.0,
         "device": "cpu", "threads": 1, "history": [], "config": cfg, "defense_config": {}, "model_key": "k",
         "artifacts": {}, "code_version": "test", "created": "now", "train_seconds": 3.0}
    r.update(kw)
    return r


def records():
    out = []
    # No Defense: a1 ASR 100/ACC 90 (seed 0) and 98/92 (seed 1); a2 ASR 96/ACC 94 both seeds.
    for s, (a1, c1) in enumerate([(100, 90), (98, 92)]):
        out += [rec(BENIGN, NO_DEFENSE, s, 95, None), rec("a1", NO_DEFENSE, s, c1, a1),
                rec("a2", NO_DEFENSE, s, 94, 96)]
    # d1: a1 -> ASR 2/ACC 88 and 4/ACC 90; a2 -> ASR 6/ACC 90 and 2/ACC 92; Benign -> ACC 93/94
    for s, (x1, y1, x2, y2, b) in enumerate([(2, 88, 6, 90, 93), (4, 90, 2, 92, 94)]):
        out += [rec("a1", "d1", s, y1, x1), rec("a2", "d1", s, y2, x2), rec(BENIGN, "d1", s, b, None)]
    # a sample-efficiency point: d1 with 5 clean images per class, seed 0 only
    out += [rec("a1", "d1", 0, 80, 30, n=5), rec("a2", "d1", 0, 82, 50, n=5)]
    return out


def test_tradeoff_plots_the_average_asr_after_against_the_avg_acc_drop():
    """x of the trade-off plot: mean over attacks of the seed-mean ASR after, std over complete seeds."""
    from nft.report import avg_after

    g, attacks = group(records()), [BENIGN, "a1", "a2"]
    mu, sd, k = avg_after(g, attacks, "d1", 50, "asr")  # a1 (2 + 4) / 2 = 3, a2 (6 + 2) / 2 = 4; seeds 0: 4, 1: 3
    assert mu == pytest.approx(3.5) and sd == pytest.approx(0.5 ** 0.5) and k == 2
    assert avg_after(g, attacks, "d1", 5, "asr") == (pytest.approx(40.0), None, 2)  # one seed: no spread
    assert avg_after(g, attacks, "nosuch", 50, "asr") == (None, None, 0)


def test_mean_std_and_format():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)
    assert mean_std([None, 4.0, float("nan")]) == (4.0, 0.0, 1)
    assert mean_std([None]) == (None, None, 0)
    assert fmt(2.0, 1.41421, 2) == "2.00 ± 1.41"
    assert fmt(2.0, 0.0, 1) == "2.00" and fmt(None) == "–"


def test_avg_drop_is_the_papers():
    recs = records()
    g = group(recs)
    attacks = [BENIGN, "a1", "a2"]
    # seed means: None a1 ASR 99 ACC 91, a2 ASR 96 ACC 94; d1 a1 ASR 3 ACC 89, a2 ASR 4 ACC 91
    # drops: ASR (96 + 92) / 2 = 94, ACC (2 + 3) / 2 = 2.5. Benign (ACC drop 1.5) is excluded.
    mu, sd, k = avg_drop(g, attacks, "d1", 50, "asr")
    assert mu == pytest.approx(94.0) and k == 2
    # per seed: seed 0 (98 + 90) / 2 = 94, seed 1 (94 + 94) / 2 = 94 -> std 0
    assert sd == pytest.approx(0.0)
    mu, sd, _ = avg_drop(g, attacks, "d1", 50, "acc")
    # per seed: seed 0 (2 + 4) / 2 = 3, seed 1 (2 + 2) / 2 = 2 -> mean 2.5, std 0.7071
    assert mu == pytest.approx(2.5) and sd == pytest.approx(0.5 ** 0.5)
    # the ANP column of the paper's CIFAR-10 Table 1 checks the same arithmetic: here on two attacks
    # with cells missing, drops pair by seed: d1 at 5/class exists for seed 0 only
    mu, sd, k = avg_drop(g, attacks, "d1", 5, "asr")
    assert mu == pytest.approx(((100 - 30) + (96 - 50)) / 2) and sd is None and k == 2
    # an attack without the defended cell is left out, and the table says so
    partial = {key: v for key, v in g.items() if key != ("a2", "d1", 50)}
    assert avg_drop(partial, attacks, "d1", 50, "asr")[0] == pytest.approx(96.0)
    from nft.report import drop_cell

    assert drop_cell(partial, attacks, "d1", 50, "asr") == "96.00 (1/2 attacks)"  # no seed has every attack


def test_table1_layout():
    sec = sections(records())[0]
    assert sec.attacks == [BENIGN, "a1", "a2"] and sec.defenses == [NO_DEFENSE, "d1"] and sec.main_size == 50
    t = table1(sec)
    assert t.header == ["Attack", "No Defense ASR", "No Defense ACC", "D1 ASR", "D1 ACC"]
    rows = {r[0]: r[1:] for r in t.rows}
    assert list(rows) == ["Benign", "a1", "a2", "Avg. Drop"]
    assert rows["Benign"] == ["–", "95.00 ± 0.00", "–", "93.50 ± 0.71"]
    assert rows["a1"] == ["99.00 ± 1.41", "91.00 ± 1.41", "3.00 ± 1.41", "89.00 ± 1.41"]
    assert rows["Avg. Drop"] == ["–", "–", "94.00 ± 0.00", "2.50 ± 0.71"]
    assert table1(sections(records(), size=5)[0]).rows[-1][3] == "58.00"  # one seed: no ±


def test_sections_split_by_training_setting():
    other = [dict(r, cell_id="p05-" + r["cell_id"], config=dict(r["config"], model=dict(r["config"]["model"],
                                                                                      poison_rate=0.05)))
             for r in records()]
    secs = sections(records() + other)
    assert [s.name for s in secs] == ["toy · m [poison_rate=0.05]", "toy · m [poison_rate=0.1]"]
    assert [len(s.records) for s in secs] == [len(other), len(other)]
    assert [s.name for s in sections(records())] == ["toy · m"]


def test_an_attack_with_its_own_training_setting_stays_in_the_table():
    """Like the paper's Table 1: SIG/CLB poison at their own rate, in the same table, and the settings say so."""
    from nft.report import settings_md

    recs = records()
    for r in recs:
        if r["attack"] == "a2":
            r["config"] = dict(r["config"], model=dict(r["config"]["model"], poison_rate=0.08, epochs=3))
    secs = sections(recs)
    assert [s.name for s in secs] == ["toy · m"] and secs[0].attacks == [BENIGN, "a1", "a2"]
    md = settings_md(secs[0])
    assert "- poisoning: rate 0.1, target 0, all2one; training 1 epochs" in md
    assert "; **a2**: poison_rate 0.08, epochs 3" in md


def test_an_attacks_own_kwargs_are_named_and_two_of_them_split_the_table():
    """ISSBA's grid records name steps/ramp_by: the settings say so; records of one attack under two kwargs
    (an old fit and a new one) are not averaged together but go to sections of their own."""
    from nft.report import settings_md

    recs = records()
    for r in recs:
        if r["attack"] == "a2":
            r["config"] = dict(r["config"], model=dict(r["config"]["model"], attack_kwargs={"steps": 12, "ramp_by": 4}))
    secs = sections(recs)
    assert [s.name for s in secs] == ["toy · m"]
    assert "; **a2**: ramp_by 4, steps 12\n" in settings_md(secs[0])
    old = [dict(r, cell_id="old-" + r["cell_id"]) for r in records() if r["attack"] == "a2"]  # no kwargs: {}
    names = [s.name for s in sections(recs + old)]
    assert len(names) == 2 and all("attack_kwargs=" in n for n in names), names


def test_the_settings_name_the_newest_code_version_when_records_differ():
    from nft.report import settings_md

    recs = records()
    for i, r in enumerate(recs):
        r["code_version"], r["created"] = f"0.1.0+v{i % 3}", f"2026-12-0{1 + i % 3}T00:00:00"
    assert "code: 3 versions, newest 0.1.0+v2 (each record keeps its own)" in settings_md(sections(recs)[0])
    for r in recs:
        r["code_version"] = "0.1.0+one"
    md = settings_md(sections(recs)[0])
    assert "code: 0.1.0+one\n" in md and "versions" not in md


def test_mixed_defense_settings_are_flagged():
    from nft.report import mixed_settings, settings_md

    recs = records()
    for r in recs:
        r["defense_config"] = {"steps": 400, "lr": 0.05}
    assert mixed_settings(recs, "d1") == ""
    recs[6]["defense_config"] = {"steps": 1000, "lr": 0.05}
    assert mixed_settings(recs, "d1").startswith("steps (50/class): 1000 in 1 cell(s) (a1-d1-50-0); 400 in")
    assert "**warning**: D1 ran with different settings" in settings_md(sections(recs)[0])
    recs[6]["defense_config"] = {"steps": 400, "lr": 0.05}
    d1 = [r for r in recs if r["defense"] == "d1" and r["clean_per_class"] == 50]
    for r in d1[:2]:
        r["defense_config"]["neuron_after"] = 0.0  # an option added later: absent from the older records
    assert len(d1) > 2 and mixed_settings(recs, "d1") == ""
    d1[0]["defense_config"]["neuron_after"] = 0.25  # two recorded values do differ
    assert mixed_settings(recs, "d1").startswith("neuron_after")


def test_settings_that_differ_only_by_clean_set_size_are_not_flagged():
    """A recipe may resolve by clean-set size (NFT's one-shot mode): that is not a change between runs."""
    from nft.report import mixed_settings

    recs = records()  # d1 ran at 50 and at 5 images per class
    for r in recs:
        r["defense_config"] = {"adv_after": 0.125 if r["clean_per_class"] == 5 else 0.0625}
    assert mixed_settings(recs, "d1") == ""
    recs[6]["defense_config"] = {"adv_after": 0.5}  # a 50/class cell that really differs
    assert mixed_settings(recs, "d1") == "adv_after (50/class): 0.5 in 1 cell(s) (a1-d1-50-0); 0.0625 in 5 cell(s)"


def test_oneshot_overrides_count_only_where_they_applied():
    """Editing NFT's one-shot overrides changes nothing at 50/class: those cells are not flagged; at the
    one-shot size they are."""
    from nft.report import mixed_settings

    recs = records()  # d1 ran at 50 and at 5 images per class
    for i, r in enumerate(recs):
        r["defense_config"] = {"steps": 200, "oneshot_upto": 5, "oneshot": {"mask_reset": 0.5} if i % 2 else {}}
    fifty = [r for r in recs if r["clean_per_class"] == 50]
    assert mixed_settings(fifty, "d1") == ""
    five = [r for r in recs if r["clean_per_class"] == 5 and r["defense"] == "d1"]
    assert len({str(r["defense_config"]["oneshot"]) for r in five}) == 2  # the test does mix them at 5/class
    assert mixed_settings(five, "d1").startswith("oneshot: ")


def test_report_files_from_hand_made_records(tmp_path):
    root = str(tmp_path)
    for r in records():
        if r["defense"] != NO_DEFENSE:
            r["history"] = [{"step": s, "acc": 90 + s / 10, "asr": 100 - s} for s in (0, 50, 100)]
            # round-based defenses (I-BAU, AWM) log evaluations per round and loss-only steps: not plotted
            r["history"] += [{"round": 0, "acc": 50.0, "asr": 50.0}, {"phase": "inner", "step": 10, "loss": 1.0}]
        write_record(root, r)
    paths = build_report(root, tsne_samples=0)
    md = open(paths["markdown"]).read()
    assert "### Table 1" in md and "| Avg. Drop | – | – | 94.00 ± 0.00 | 2.50 ± 0.71 |" in md
    rows = list(csv.reader(io.StringIO(open(paths["table1_csv"]).read())))
    assert rows[0][:4] == ["section", "clean_per_class", "Attack", "No Defense ASR"]
    assert rows[-1][2] == "Avg. Drop" and float(rows[-1][5]) == pytest.approx(94.0)
    summary = list(csv.DictReader(open(paths["summary_csv"])))
    assert len(summary) == 3 + 3 + 2
    html = open(paths["html"]).read()
    assert html.count("data:image/png;base64,") == len(paths["figures"]) == 5
    _check_pngs(paths["figures"])


def _check_pngs(figures):
    import matplotlib.image as mpimg

    for p in figures:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
        assert os.path.getsize(p) > 5000, p
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01


def test_report_of_a_real_bench_grid_with_tsne(tmp_path, capsys):
    """A tiny real grid, then `nft report`: every plot, the t-SNE from the saved models included."""
    from nft.cli import main

    out = str(tmp_path / "res")
    rc = main(["bench", "--attacks", "badnets", "--defenses", "nft:default", "--seeds", "0,1",
               "--clean-per-class", "5,2", "--inline", "--out", out, "--model", "smallcnn", "--width", "4",
               "--epochs", "1", "--batch-size", "64", "--subset-train", "400", "--subset-test", "200",
               "--set", "nft.steps=8", "--set", "nft.eval_every=4", "--set", "nft.log_every=4",
               "--set", "nft.batch_size=32", "--threads", "1", "--no-progress"])
    assert rc == 0
    assert main(["report", out, "--tsne-samples", "120"]) == 0
    printed = capsys.readouterr().out
    assert "Avg. Drop" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    figs = sorted(os.listdir(os.path.join(out, "report")))
    assert {"s0_bars.png", "s0_purification.png", "s0_sample_efficiency.png", "s0_runtime.png", "s0_tradeoff.png",
            "s0_tsne_badnets.png"} <= set(figs), figs
    assert summary["figures"] == 6
    _check_pngs([os.path.join(out, "report", f) for f in figs if f.endswith(".png")])
    md = open(os.path.join(out, "report", "report.md")).read()
    assert "± " in md and "| Benign |" in md and "| badnets |" in md


def test_drops_are_taken_against_the_model_each_record_defended():
    """A cell whose ``before`` (its own model, e.g. rebuilt on another CPU) differs from the No Defense cell's
    model drops from its own; a record without ``before`` falls back to the No Defense cell."""
    from nft.report import drop_by_seed
    from nft.report_claims import claims_table

    recs = [rec("a1", NO_DEFENSE, 0, 90, 100), rec("a1", NO_DEFENSE, 1, 92, 98)]
    recs += [rec("a1", "nft:default", 0, 89, 2, before={"acc": 95.0, "asr": 99.0, "ra": 0.0}),
             rec("a1", "nft:default", 1, 91, 4), rec("a1", "ibau", 0, 80, 10)]
    g = group(recs)
    assert drop_by_seed(g, "a1", "nft:default", 50, "acc") == {0: pytest.approx(6.0), 1: pytest.approx(1.0)}
    assert drop_by_seed(g, "a1", "nft:default", 50, "asr") == {0: pytest.approx(97.0), 1: pytest.approx(94.0)}
    assert avg_drop(g, ["a1"], "nft:default", 50, "acc")[0] == pytest.approx(3.5)
    rows = {r[0]: r[1:] for r in claims_table(sections(recs)[0]).rows}
    assert rows["50/class: average ACC drop <= 1"] == ["3.50", "**not met**", "1/1"]
    # against I-BAU on (a1, seed 0), each against its own model: 95 - 89 = 6 vs 90 - 80 = 10
    assert rows["ACC drop smaller than IBAU's"] == ["6.00 vs 10.00", "met", "1/1"]


def test_claims_table_checks_targets_and_pairs_cells():
    """NFT default against the targets and a baseline, on hand-made records: only cells both have count."""
    from nft.report_claims import claims_table

    recs = [r for r in records() if r["defense"] == NO_DEFENSE and r["attack"] != BENIGN]
    # nft:default: a1 ASR 1/ACC 90 (seed 0), 3/91 (seed 1); a2 ASR 0/ACC 93 (seed 0 only); 1/class a1 ASR 9
    recs += [rec("a1", "nft:default", 0, 90, 1, seconds=20.0), rec("a1", "nft:default", 1, 91, 3, seconds=30.0),
             rec("a2", "nft:default", 0, 93, 0, seconds=40.0), rec("a1", "nft:default", 0, 87, 9, n=1)]
    # ibau on a1 seed 0 only: ASR 10, ACC 80, 10 s
    recs += [rec("a1", "ibau", 0, 80, 10, seconds=10.0)]
    t = claims_table(sections(recs)[0])
    rows = {r[0]: r[1:] for r in t.rows}
    # average ASR: a1 mean(1, 3) = 2, a2 0 -> 1.0; ACC drop: a1 mean(90-90, 92-91) = 0.5, a2 94-93 = 1 -> 0.75
    assert rows["50/class: average ASR <= 2"] == ["1.00", "met", "2/2"]
    assert rows["50/class: average ACC drop <= 1"] == ["0.75", "met", "2/2"]
    # one-shot: a1 only, ASR 9 > 5 -> not met, said plainly
    assert rows["1/class: average ASR <= 5"] == ["9.00", "**not met**", "1/2"]
    # against I-BAU only on (a1, seed 0): ASR drop 100-1 vs 100-10; ACC drop 0 vs 10; 20 s vs 10 s
    assert rows["ASR drop larger than IBAU's"] == ["99.00 vs 90.00", "met", "1/2"]
    assert rows["ACC drop smaller than IBAU's"] == ["0.00 vs 10.00", "met", "1/2"]
    assert rows["less time than IBAU"] == ["20.0 s vs 10.0 s", "**not met**", "1/2"]
    # no cell recorded CPU seconds: no CPU row
    assert "less CPU time than IBAU" not in rows
    # CPU seconds compare only the cells where both defenses recorded them (a1 seed 0 here)
    for r in recs:
        if r["defense"] == "ibau":
            r["cpu_seconds"] = 12.0
        elif r["defense"] == "nft:default" and r["seed"] == 0 and r["attack"] == "a1" and r["clean_per_class"] == 50:
            r["cpu_seconds"] = 8.0
    rows = {r[0]: r[1:] for r in claims_table(sections(recs)[0]).rows}
    assert rows["less CPU time than IBAU"] == ["8.0 s vs 12.0 s", "met", "1/2"]
    # no record names its processor: no same-CPU row; once both a1 seed-0 cells name one, it compares those
    assert "less time than IBAU, same CPU model" not in rows
    for r in recs:
        if r["defense"] in ("ibau", "nft:default") and r["attack"] == "a1" and r["seed"] == 0:
            r["cpu"] = "Xeon"
    rows = {r[0]: r[1:] for r in claims_table(sections(recs)[0]).rows}
    assert rows["less time than IBAU, same CPU model"] == ["20.0 s vs 10.0 s (1 cell)", "**not met**", "1/2"]
    # a pair run on two different processors does not count
    next(r for r in recs if r["defense"] == "ibau")["cpu"] = "EPYC"
    rows = {r[0]: r[1:] for r in claims_table(sections(recs)[0]).rows}
    assert "less time than IBAU, same CPU model" not in rows
    # no NFT default in the records: no claims table
    assert claims_table(sections([r for r in recs if r["defense"] != "nft:default"])[0]) is None


def test_sample_efficiency_compares_each_defense_on_the_same_cells():
    """d1 ran at 50/class on seeds 0 and 1 but at 5/class on seed 0 only: both rows use seed 0's cells."""
    from nft.report import efficiency_rows, efficiency_table

    rows = {(d, n): (asr, acc, k) for d, n, asr, acc, k in efficiency_rows(sections(records())[0])}
    assert rows[("d1", 50)][0] == (4.0, 0.0, 1) and rows[("d1", 50)][2] == 2  # mean of a1 2 and a2 6, seed 0
    assert rows[("d1", 5)][0] == (40.0, 0.0, 1) and rows[("d1", 5)][1][0] == 81.0
    assert efficiency_table(sections(records())[0]).rows[0] == ["D1", "5", "40.00", "81.00", "2"]


def test_one_process_timings_enter_the_claims_table(tmp_path):
    """``RESULTS/timing/*.json`` (benchmarks/timing.py) give 'less CPU time than X, one process' rows: met only when
    NFT used less CPU than X on every timed model of the section; files of another section or without one are ignored."""
    from nft.report_claims import claims_table, load_timings

    recs = [rec("a1", NO_DEFENSE, 0, 98.0, 100.0), rec("a1", "nft:default", 0, 97.5, 1.0),
            rec("a1", "ibau", 0, 90.0, 10.0), rec("a1", "awm", 0, 97.0, 50.0)]
    os.makedirs(tmp_path / "timing")
    where = {"dataset": "toy", "model": "m", "model_kwargs": {}, "attack": "a1"}
    for seed, cpu in ((0, {"nft:default": 100.0, "ibau": 140.0, "awm": 90.0}),
                      (1, {"nft:default": 120.0, "ibau": 130.0, "awm": 240.0})):
        (tmp_path / "timing" / f"b{seed}.json").write_text(json.dumps({**where, "seed": seed, "median_cpu": cpu}))
    (tmp_path / "timing" / "other.json").write_text(json.dumps({**where, "dataset": "other", "seed": 0,
                                                                "median_cpu": {"nft:default": 1.0, "ibau": 0.5}}))
    (tmp_path / "timing" / "old.json").write_text(json.dumps({"median_cpu": {"nft:default": 1.0, "ibau": 0.5}}))
    timings = load_timings(str(tmp_path))
    assert len(timings) == 3
    rows = {r[0]: r[1:] for r in claims_table(sections(recs)[0], timings).rows}
    ibau = rows["less CPU time than IBAU, one process (timing)"]
    assert ibau[0] == "110.0 s vs 135.0 s (1.23x)" and ibau[1] == "met" and ibau[2].startswith("2/2 models")
    awm = rows["less CPU time than AWM, one process (timing)"]
    assert awm[1] == "**not met**" and awm[2].startswith("1/2 models")
