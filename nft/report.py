"""Tables and plots from bench records only: nothing is trained or purified again.

``build_report(results_dir)`` writes into ``results_dir/report/``:

- ``report.md``: per (dataset, model) the paper's Table 1 layout (rows: attacks with Benign first;
  per defense ASR and ACC, mean ± std over seeds; an Avg. Drop row), then RA, DER, seconds and peak
  memory per cell, and a sample-efficiency table over the clean-set sizes;
- ``table1.csv`` (the layout above, means) and ``summary.csv`` (one row per attack x defense x size,
  mean and std of every metric);
- the PNG plots of nft.report_plots and ``report.html``, one self-contained page (images inlined).

Avg. Drop is computed as the paper does: for each defense, the mean over attacks (Benign excluded)
of (No Defense value - defended value) in points, paired by seed; its ± is the std over seeds of
the same quantity computed per seed (only seeds where every attack has both cells). A partial grid
says over how many attacks its Avg. Drop was taken.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from .io import atomic_write_text
from .records import BENIGN, NO_DEFENSE, load_records

METRICS = ("acc", "asr", "ra", "der", "seconds", "peak_mb")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    """The records of one (dataset, model) and what the tables need to know about them."""

    name: str
    records: list[dict]
    attacks: list[str] = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)  # 'none' first
    sizes: list[int] = field(default_factory=list)
    main_size: int | None = None


# ---------------------------------------------------------------------------------------------
# arithmetic

def _vals(values) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_std(values) -> tuple[float | None, float | None, int]:
    """(mean, sample std (ddof 1; 0 for one value), count) of the values that are not None/NaN."""
    v = _vals(values)
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def fmt(mean: float | None, std: float | None = None, n: int = 1, digits: int = 2) -> str:
    if mean is None:
        return "–"
    s = f"{mean:.{digits}f}"
    return f"{s} ± {std:.{digits}f}" if n > 1 and std is not None else s


def group(records: list[dict]) -> dict[tuple, list[dict]]:
    """(attack, defense, clean_per_class) -> records (one per seed). 'none' cells have size None."""
    out = defaultdict(list)
    for r in records:
        n = None if r["defense"] == NO_DEFENSE else r["clean_per_class"]
        out[(r["attack"], r["defense"], n)].append(r)
    return out


def _cell(groups, attack: str, defense: str, size) -> list[dict]:
    """The records of one cell (one per seed); No Defense cells have no clean-set size."""
    return groups.get((attack, defense, None if defense == NO_DEFENSE else size), [])


def cell_stats(groups, attack: str, defense: str, size, metric: str):
    return mean_std(r.get(metric) for r in _cell(groups, attack, defense, size))


def _by_seed(groups, attack: str, defense: str, size, metric: str) -> dict[int, float]:
    return {r["seed"]: float(r[metric]) for r in _cell(groups, attack, defense, size) if r.get(metric) is not None}


def drop_by_seed(groups, attack: str, defense: str, size, metric: str) -> dict[int, float]:
    """seed -> (the defended model's ``metric`` - the cell's), in points. The defended model's value is the
    record's own ``before`` (measured on the very model the defense ran on), or, in records without it, the No
    Defense cell of that (attack, seed): a model rebuilt later (a fit attack's on another CPU, a re-run row) can
    differ from the one the No Defense cell measured."""
    base = _by_seed(groups, attack, NO_DEFENSE, None, metric)
    out = {}
    for r in _cell(groups, attack, defense, size):
        before = (r.get("before") or {}).get(metric)
        ref = before if before is not None else base.get(r["seed"])
        if ref is not None and r.get(metric) is not None:
            out[r["seed"]] = float(ref) - float(r[metric])
    return out


def avg_drop(groups, attacks: list[str], defense: str, size, metric: str) -> tuple[float | None, float | None, int]:
    """The paper's Avg. Drop of ``metric`` for ``defense``: mean over attacks (not Benign) of
    (No Defense - defended) in points (``drop_by_seed``: against the record's own model); each attack's drop
    is the mean over its seeds (with every cell present, this is the drop of the seed means). Returns (mean,
    std over seeds of the per-seed Avg. Drop (seeds where every attack has a cell), number of attacks)."""
    return _over_attacks(attacks, lambda a: drop_by_seed(groups, a, defense, size, metric))


def avg_after(groups, attacks: list[str], defense: str, size, metric: str) -> tuple[float | None, float | None, int]:
    """As ``avg_drop``, of ``metric`` itself after the defense (e.g. the average ASR left)."""
    return _over_attacks(attacks, lambda a: _by_seed(groups, a, defense, size, metric))


def _over_attacks(attacks: list[str], by_seed) -> tuple[float | None, float | None, int]:
    """(mean over attacks, not Benign, of the seed mean of ``by_seed(attack)`` (seed -> value), std over the
    seeds where every attack has a value of their per-seed average, number of attacks with a value)."""
    real = [a for a in attacks if a != BENIGN]
    per_attack, per_seed = [], defaultdict(list)
    for a in real:
        pairs = by_seed(a)
        if pairs:
            per_attack.append(statistics.fmean(pairs.values()))
        for s, v in pairs.items():
            per_seed[s].append(v)
    if not per_attack:
        return None, None, 0
    complete = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(real)]
    std = statistics.stdev(complete) if len(complete) > 1 else None
    return statistics.fmean(per_attack), std, len(per_attack)


def drop_cell(groups, attacks: list[str], defense: str, size, metric: str) -> str:
    """Avg. Drop as a table cell; '(k/n attacks)' when only k of the n attacks have both cells."""
    mu, sd, k = avg_drop(groups, attacks, defense, size, metric)
    n = len([a for a in attacks if a != BENIGN])
    text = fmt(mu, sd, 2 if sd is not None else 1)
    return text + (f" ({k}/{n} attacks)" if mu is not None and k < n else "")


# ---------------------------------------------------------------------------------------------
# sections and tables

def defense_label(d: str) -> str:
    if d == NO_DEFENSE:
        return "No Defense"
    name, _, variant = d.partition(":")
    return f"{name.upper()} ({variant})" if variant else name.upper()


def attack_label(a: str) -> str:
    return "Benign" if a == BENIGN else a


def _defense_order(d: str):
    name = d.partition(":")[0]
    return (d != NO_DEFENSE, name == "nft", d)


SETTING_KEYS = ("poison_rate", "target", "label_mode", "epochs", "batch_size", "lr", "subset_train", "subset_test",
                "attack_kwargs")


def _setting(r: dict) -> tuple:
    """The model's training setting; the attack's own settings (``attack_kwargs``) as sorted JSON (hashable)."""
    m = (r.get("config") or {}).get("model") or {}
    return tuple((k, json.dumps(m.get(k) or {}, sort_keys=True) if k == "attack_kwargs" else m.get(k))
                 for k in SETTING_KEYS)


def section_name(dataset: str, model: str, model_kwargs: dict | None) -> str:
    """'dataset · model (k=v, ...)': the name of the section a (dataset, model, its kwargs) falls in."""
    kw = ", ".join(f"{k}={v}" for k, v in sorted((model_kwargs or {}).items()))
    return f"{dataset} · {model}" + (f" ({kw})" if kw else "")


def sections(records: list[dict], size: int | None = None) -> list[Section]:
    """One section per (dataset, model, its kwargs), like the paper's Table 1, whose attacks may each
    have their own training setting (SIG and CLB poison at a lower rate; the settings list says so).
    Only where one *attack* was benchmarked under several settings (e.g. two poison rates) is the
    section split per setting, with the setting that differs in its name."""
    by_base = defaultdict(list)
    for r in records:
        by_base[section_name(r["dataset"], r["model"], r.get("model_kwargs"))].append(r)
    out = []
    for base, recs in sorted(by_base.items()):
        per_attack = defaultdict(set)
        for r in recs:
            per_attack[r["attack"]].add(_setting(r))
        if all(len(v) == 1 for v in per_attack.values()):
            groups = [(base, recs)]
        else:
            by = defaultdict(list)
            for r in recs:
                by[_setting(r)].append(r)
            groups = []
            for setting, rs in sorted(by.items(), key=lambda kv: str(kv[0])):
                differ = [k for i, (k, v) in enumerate(setting) if len({st[i][1] for st in by}) > 1]
                groups.append((base + " [" + ", ".join(f"{k}={dict(setting)[k]}" for k in differ) + "]", rs))
        for name, rs in groups:
            s = Section(name, rs)
            s.attacks = sorted({r["attack"] for r in rs}, key=lambda a: (a != BENIGN, a))
            s.defenses = sorted({r["defense"] for r in rs}, key=_defense_order)
            s.sizes = sorted({r["clean_per_class"] for r in rs if r["defense"] != NO_DEFENSE})
            s.main_size = size if size in s.sizes else (max(s.sizes) if s.sizes else None)
            out.append(s)
    return out


def attack_settings(sec: Section) -> tuple[dict, dict[str, dict]]:
    """(the training setting most attacks share, {attack: the keys where its own differs})."""
    per_attack = {}
    for r in sec.records:
        per_attack.setdefault(r["attack"], dict(_setting(r)))
    common = {}
    for k in SETTING_KEYS:
        values = [json.dumps(st.get(k)) for st in per_attack.values()]
        common[k] = json.loads(max(set(values), key=lambda v: (values.count(v), v)))
    own = {a: {k: v for k, v in st.items() if v != common[k]} for a, st in per_attack.items()}
    return common, {a: d for a, d in sorted(own.items()) if d and a != BENIGN}


def table1(sec: Section) -> Table:
    g = group(sec.records)
    header = ["Attack"] + [f"{defense_label(d)} {m}" for d in sec.defenses for m in ("ASR", "ACC")]
    rows = []
    for a in sec.attacks:
        row = [attack_label(a)]
        for d in sec.defenses:
            for m in ("asr", "acc"):
                row.append(fmt(*cell_stats(g, a, d, sec.main_size, m)))
        rows.append(row)
    drop = ["Avg. Drop"]
    for d in sec.defenses:
        for m in ("asr", "acc"):
            drop.append("–" if d == NO_DEFENSE else drop_cell(g, sec.attacks, d, sec.main_size, m))
    rows.append(drop)
    seeds = sorted({r["seed"] for r in sec.records})
    note = (f"ASR/ACC in %, mean ± std over seeds {seeds}; defenses use {sec.main_size} clean images per class. "
            "Avg. Drop: mean over attacks (Benign excluded) of the drop in points against No Defense "
            "(ASR drop: higher is better; ACC drop: lower is better).")
    return Table("Table 1: ASR and ACC per attack and defense", header, rows, note)


def detail_table(sec: Section) -> Table:
    g = group(sec.records)
    header = ["Attack", "Defense", "clean/class", "seeds", "ACC", "ASR", "RA", "DER", "seconds", "peak MB"]
    rows = []
    for a in sec.attacks:
        for d in sec.defenses:
            for n in ([None] if d == NO_DEFENSE else sec.sizes):
                recs = g.get((a, d, n), [])
                if not recs:
                    continue
                cells = [fmt(*mean_std(r.get(m) for r in recs), digits=3 if m == "der" else 2) for m in METRICS]
                if d == NO_DEFENSE:  # its cost is the training's
                    cells[4] = fmt(*mean_std(r.get("train_seconds") for r in recs), digits=1) + " (train)"
                    cells[5] = fmt(*mean_std(r.get("train_peak_mb") for r in recs), digits=1) + " (train)"
                rows.append([attack_label(a), defense_label(d), "–" if n is None else str(n), str(len(recs))] + cells)
    return Table("All cells: ACC, ASR, RA, DER, time and peak memory", header, rows,
                 "mean ± std over seeds. DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 against the undefended model "
                 "(0.5 = no change). seconds: the defense alone (the monitor's evaluations excluded); peak MB: "
                 "CUDA allocator peak on GPU, resident-memory peak above the start on CPU.")


def efficiency_rows(sec: Section) -> list[tuple[str, int, tuple, tuple, int]]:
    """(defense, size, ASR (mean, std, n), ACC (mean, std, n), cells) averaged over attacks (not
    Benign); the std is over seeds of the attack-averaged value. A defense's sizes are compared on
    the same (attack, seed) cells: those it has at every one of its sizes (``cells`` counts them)."""
    g = group(sec.records)
    real = [a for a in sec.attacks if a != BENIGN] or sec.attacks
    out = []
    for d in sec.defenses:
        if d == NO_DEFENSE:
            continue
        sizes = [n for n in sec.sizes if any(g.get((a, d, n)) for a in real)]
        have = [{(a, r["seed"]) for a in real for r in g.get((a, d, n), [])} for n in sizes]
        common = set.intersection(*have) if have else set()
        for n in sizes:
            stats = []
            for m in ("asr", "acc"):
                per_seed = defaultdict(list)
                for a in real:
                    for r in g.get((a, d, n), []):
                        if r.get(m) is not None and (a, r["seed"]) in common:
                            per_seed[r["seed"]].append(r[m])
                stats.append(mean_std([statistics.fmean(v) for v in per_seed.values()]))
            if stats[1][2]:
                out.append((d, n, stats[0], stats[1], len(common)))
    return out


def efficiency_table(sec: Section) -> Table:
    rows = [[defense_label(d), str(n), fmt(*asr), fmt(*acc), str(k)] for d, n, asr, acc, k in efficiency_rows(sec)]
    return Table("Sample efficiency: clean images per class", ["Defense", "clean/class", "ASR", "ACC", "cells"], rows,
                 "mean over attacks (Benign excluded), ± std over seeds; each defense's sizes are compared on the "
                 "same (attack, seed) cells, those it has at all of its sizes (cells).")


# ---------------------------------------------------------------------------------------------
# writers

def to_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(t.header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines) + "\n"


def table1_csv(secs: list[Section]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    for sec in secs:
        t = table1(sec)
        w.writerow(["section", "clean_per_class"] + t.header)
        g = group(sec.records)
        for a in sec.attacks:
            w.writerow([sec.name, sec.main_size, attack_label(a)] + [
                _num(cell_stats(g, a, d, sec.main_size, m)[0]) for d in sec.defenses for m in ("asr", "acc")])
        w.writerow([sec.name, sec.main_size, "Avg. Drop"] + [
            "" if d == NO_DEFENSE else _num(avg_drop(g, sec.attacks, d, sec.main_size, m)[0])
            for d in sec.defenses for m in ("asr", "acc")])
    return buf.getvalue()


def summary_csv(secs: list[Section]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "model", "model_kwargs", "attack", "defense", "clean_per_class", "seeds"] +
               [f"{m}_{s}" for m in METRICS + ("cpu_seconds", "train_seconds") for s in ("mean", "std")])
    for sec in secs:
        for (a, d, n), recs in sorted(group(sec.records).items(), key=lambda kv: str(kv[0])):
            r0 = recs[0]
            row = [r0["dataset"], r0["model"], json.dumps(r0.get("model_kwargs") or {}, sort_keys=True), a, d,
                   "" if n is None else n, " ".join(str(r["seed"]) for r in sorted(recs, key=lambda r: r["seed"]))]
            for m in METRICS + ("cpu_seconds", "train_seconds"):
                mu, sd, _ = mean_std(r.get(m) for r in recs)
                row += [_num(mu), _num(sd)]
            w.writerow(row)
    return buf.getvalue()


def _num(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _num_g(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _flat(setting: dict) -> dict:
    """An attack's own setting for display, its ``attack_kwargs`` (JSON) spelled out as keys of their own."""
    d = dict(setting)
    kwargs = json.loads(d.pop("attack_kwargs", "{}"))
    return {**d, **kwargs}


def settings_md(sec: Section) -> str:
    """What a reader needs to compare this table with others (peers.md §3's comparability list)."""
    r = next((r for r in sec.records if r["defense"] == NO_DEFENSE), sec.records[0])
    common, own = attack_settings(sec)
    m = {**r["config"]["model"], **common}
    defs = {}
    main_first = sorted(sec.records, key=lambda rec: rec.get("clean_per_class") != sec.main_size)
    for rec in main_first:  # the settings shown are those of the main table's clean-set size
        if rec["defense"] != NO_DEFENSE and rec["defense"] not in defs:
            defs[rec["defense"]] = rec.get("defense_config") or {}
    versions = {rec.get("code_version", "?") for rec in sec.records}
    newest = max(sec.records, key=lambda rec: rec.get("created") or "").get("code_version", "?")
    lines = [f"- architecture: `{m['arch']}` {m.get('arch_kwargs') or ''}; dataset `{m['dataset']}`"
             + (f" (train subset {m['subset_train']})" if m.get("subset_train") else "")
             + (f" (test subset {m['subset_test']})" if m.get("subset_test") else ""),
             f"- poisoning: rate {m['poison_rate']}, target {m['target']}, {m['label_mode']}; training "
             f"{m['epochs']} epochs, batch {m['batch_size']}, lr {m['lr']}"
             + "".join(f"; **{attack_label(a)}**: " + ", ".join(f"{k} {_num_g(v)}" for k, v in _flat(d).items())
                       for a, d in own.items()),
             f"- clean data for defenses: {', '.join(map(str, sec.sizes))} images per class "
             f"(main table: {sec.main_size}), drawn from the defender's held-out pool (disjoint from training)",
             "- ASR counts only test images whose label the backdoor changes (non-target images for all-to-one)",
             f"- devices: {sorted({rec.get('device', '?') for rec in sec.records})}; code: "
             + (newest if len(versions) == 1 else f"{len(versions)} versions, newest {newest} (each record keeps its own)")]
    for d, cfg in defs.items():
        short = {k: v for k, v in cfg.items() if not isinstance(v, (list, dict))}
        lines.append(f"- {defense_label(d)} settings: `{json.dumps(short, sort_keys=True)}`")
        mixed = mixed_settings(sec.records, d)
        if mixed:
            lines.append(f"- **warning**: {defense_label(d)} ran with different settings across cells "
                         f"(chosen per model by the defense's own probes, or a recipe changed between runs): {mixed}")
    return "\n".join(lines) + "\n"


def applied_settings(rec: dict) -> dict:
    """The record's defense settings without NFT's one-shot overrides where they did not apply (a
    clean set above ``oneshot_upto`` per class): editing them does not change what such a cell ran."""
    cfg = dict(rec.get("defense_config") or {})
    upto, n = cfg.get("oneshot_upto"), rec.get("clean_per_class")
    if "oneshot" in cfg and (upto is None or (n is not None and n > upto)):
        cfg.pop("oneshot")
    return cfg


def mixed_settings(records: list[dict], defense: str) -> str:
    """'' when every cell of ``defense`` ran with the same resolved settings, else what differs.

    Cells are compared within one clean-set size: a recipe may resolve differently by size (NFT's
    one-shot mode), and that is the recipe, not a change between runs. A setting missing from some
    records was added after they ran (a new option's default keeps the old behaviour): only the
    records that have it are compared."""
    by_size = defaultdict(list)
    for r in records:
        if r["defense"] == defense:
            by_size[r.get("clean_per_class")].append((r["cell_id"], applied_settings(r)))
    parts = []
    for size, cfgs in sorted(by_size.items(), key=lambda kv: str(kv[0])):
        keys = sorted({k for _, c in cfgs for k in c})
        for k in [k for k in keys if len({json.dumps(c[k], sort_keys=True) for _, c in cfgs if k in c}) > 1]:
            seen = defaultdict(list)
            for cid, c in cfgs:
                if k in c:
                    seen[json.dumps(c[k])].append(cid)
            where = f" ({size}/class)" if len(by_size) > 1 else ""
            parts.append(f"{k}{where}: " + "; ".join(
                f"{v} in {len(ids)} cell(s)" + (f" ({ids[0]})" if len(ids) == 1 else "") for v, ids in seen.items()))
    return ", ".join(parts)


def _bench_main_size(results: str, records: list[dict]) -> int | None:
    try:
        with open(os.path.join(results, "bench.json")) as f:
            n = json.load(f).get("main_clean_per_class")
    except (OSError, ValueError, AttributeError):
        return None
    return n if any(r.get("clean_per_class") == n for r in records) else None


def build_report(results: str, out: str | None = None, size: int | None = None, plots: bool = True,
                 tsne_samples: int = 600) -> dict:
    """Write the report of ``results`` into ``out`` (default results/report); returns the paths."""
    from .report_claims import claims_table, load_timings  # it builds on this module

    from .report_html import write_html

    records = load_records(results)
    out = out or os.path.join(results, "report")
    os.makedirs(out, exist_ok=True)
    if size is None:  # the bench's first --clean-per-class is the main table's, when it was recorded
        size = _bench_main_size(results, records)
    secs = sections(records, size)
    timings = load_timings(results)
    md = [f"# nft benchmark report\n\n{len(records)} records from `{os.path.abspath(results)}`.\n"]
    figures: dict[str, list[tuple[str, str]]] = {}
    for i, sec in enumerate(secs):
        tables = [t for t in (claims_table(sec, timings), table1(sec), detail_table(sec), efficiency_table(sec)) if t]
        md.append(f"\n## {sec.name}\n\n**Settings**\n\n{settings_md(sec)}\n")
        md += [to_markdown(t) + "\n" for t in tables]
        if plots:
            from .report_plots import section_plots

            figs = section_plots(sec, results, out, f"s{i}", tsne_samples)
            figures[sec.name] = figs
            md.append("\n".join(f"![{cap}]({os.path.basename(p)})" for p, cap in figs) + "\n")
    paths = {"markdown": os.path.join(out, "report.md"), "table1_csv": os.path.join(out, "table1.csv"),
             "summary_csv": os.path.join(out, "summary.csv"), "html": os.path.join(out, "report.html")}
    atomic_write_text("\n".join(md), paths["markdown"])
    atomic_write_text(table1_csv(secs), paths["table1_csv"])
    atomic_write_text(summary_csv(secs), paths["summary_csv"])
    write_html(paths["html"], secs, figures, results)
    paths["figures"] = [p for figs in figures.values() for p, _ in figs]
    return paths
