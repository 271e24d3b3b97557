"""The paper's claims checked on the records: NFT ``default`` against issue 5's targets and against
every other defense on the same (attack, seed) cells (ASR drop, ACC drop, time). The first table of
``nft report``."""
from __future__ import annotations

import glob
import json
import os
import statistics

from .records import BENIGN, NO_DEFENSE
from .report import Section, Table, _by_seed, _cell, defense_label, drop_by_seed, group, section_name


PROPOSED = "nft:default"
TARGETS = {"main": (2.0, 1.0), 1: (5.0, 2.0)}  # (average ASR <=, average ACC drop <=) in points
TIMED_AGAINST = ("anp", "ibau", "ftsam", "awm")  # the paper says NFT is faster than these


def _paired(groups, attacks, defenses, size, metric, fn, drop: bool = False,
            match: str | None = None) -> tuple[float | None, int, int]:
    """Mean over attacks of the mean over seeds of ``fn(values)``, where ``values`` holds ``metric`` for each
    defense in ``defenses`` on that attack and seed (``drop``: each defense's drop of ``metric`` against the model
    it defended, ``report.drop_by_seed``); only (attack, seed) pairs where every one of those cells exists count,
    and with ``match`` (a record field such as ``cpu``) only those where every cell names the same value of it.
    Returns (mean, attacks used, cells used per defense)."""
    per_attack, cells_used = [], 0
    by_seed = drop_by_seed if drop else _by_seed
    for a in attacks:
        if a == BENIGN:
            continue
        cells = [by_seed(groups, a, d, size, metric) for d in defenses]
        seeds = set.intersection(*(set(c) for c in cells))
        if match:
            seeds = {s for s in seeds if _same(groups, a, defenses, size, s, match)}
        if seeds:
            per_attack.append(statistics.fmean(fn(*(c[s] for c in cells)) for s in sorted(seeds)))
            cells_used += len(seeds)
    return (statistics.fmean(per_attack) if per_attack else None), len(per_attack), cells_used


def _versus(groups, attacks, pair, size, metric, **kw) -> tuple[float | None, float | None, int, int]:
    """``_paired`` over the cells both defenses of ``pair`` have: (first's mean, second's mean, attacks, cells)."""
    ours, k, cells = _paired(groups, attacks, pair, size, metric, lambda v, o: v, **kw)
    theirs, _, _ = _paired(groups, attacks, pair, size, metric, lambda v, o: o, **kw)
    return ours, theirs, k, cells


def _same(groups, attack, defenses, size, seed, field: str) -> bool:
    """Whether every defense's cell of (attack, seed) recorded one and the same, known, ``field``."""
    values = {r.get(field) for d in defenses for r in _cell(groups, attack, d, size) if r["seed"] == seed}
    return len(values) == 1 and None not in values


def load_timings(results: str) -> list[dict]:
    """The one-process timing runs under ``results/timing/*.json`` (``benchmarks/timing.py --out``): every defense on
    one model and clean set, one after the other in one process, so their times compare; grid cells ran under
    whatever load each batch had. Files without ``dataset``/``model`` are skipped."""
    out = []
    for path in sorted(glob.glob(os.path.join(results, "timing", "*.json"))):
        try:
            with open(path) as f:
                t = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(t, dict) and t.get("dataset") and t.get("model") and t.get("median_cpu"):
            out.append(t)
    return out


def timing_rows(sec: Section, timings: list[dict]) -> list[list[str]]:
    """'less CPU time than X, one process' per timed-against defense: mean over the timing runs of this section
    that have both, of each one's median CPU seconds; met when NFT ``default`` used less on every one of them."""
    def in_section(t):  # the section itself, or one split from it by a training setting ('base [k=v]')
        base = section_name(t["dataset"], t["model"], t.get("model_kwargs"))
        return sec.name == base or sec.name.startswith(base + " [")

    mine = [t for t in timings if in_section(t)]
    rows = []
    for d in sorted({d for t in mine for d in t["median_cpu"]}, key=lambda d: d.partition(":")[0]):
        if d.partition(":")[0] not in TIMED_AGAINST:
            continue
        both = [t for t in mine if PROPOSED in t["median_cpu"] and d in t["median_cpu"]]
        if not both:
            continue
        ours = statistics.fmean(t["median_cpu"][PROPOSED] for t in both)
        theirs = statistics.fmean(t["median_cpu"][d] for t in both)
        faster = sum(t["median_cpu"][PROPOSED] < t["median_cpu"][d] for t in both)
        models = ", ".join(f"{t.get('attack', '?')} s{t.get('seed', '?')}" for t in both)
        rows.append([f"less CPU time than {defense_label(d)}, one process (timing)",
                     f"{ours:.1f} s vs {theirs:.1f} s ({theirs / ours:.2f}x)", "met" if faster == len(both) else
                     "**not met**", f"{faster}/{len(both)} models ({models})"])
    return rows


def claims_table(sec: Section, timings: list[dict] | None = None) -> Table | None:
    """NFT ``default`` against the targets and against every other defense, on the same cells.

    Each comparison is over the (attack, seed) cells both defenses have, so a partial grid compares
    like with like; the last column says over how many attacks. Times are wall-clock seconds of the
    defense alone under whatever load the run had (records made in one batch compare best), and,
    where both cells recorded it, the process's CPU seconds, which the other processes' load does
    not inflate."""
    if PROPOSED not in sec.defenses:
        return None
    g = group(sec.records)
    real = [a for a in sec.attacks if a != BENIGN]
    rows = []

    def verdict(ok):
        return "–" if ok is None else ("met" if ok else "**not met**")

    for key, (asr_max, drop_max) in TARGETS.items():
        n = sec.main_size if key == "main" else key
        if n not in sec.sizes:
            continue
        asr, k, _ = _paired(g, real, [PROPOSED], n, "asr", lambda v: v)
        drop, _, _ = _paired(g, real, [PROPOSED], n, "acc", lambda v: v, drop=True)
        if asr is None:
            continue
        rows.append([f"{n}/class: average ASR <= {asr_max:g}", f"{asr:.2f}", verdict(asr <= asr_max), f"{k}/{len(real)}"])
        if drop is not None:
            rows.append([f"{n}/class: average ACC drop <= {drop_max:g}", f"{drop:.2f}", verdict(drop <= drop_max),
                         f"{k}/{len(real)}"])
    n = sec.main_size
    for d in sec.defenses:
        if d in (NO_DEFENSE, PROPOSED):
            continue
        both = [PROPOSED, d]
        ours, theirs, k, _ = _versus(g, real, both, n, "asr", drop=True)
        if ours is None:
            continue
        rows.append([f"ASR drop larger than {defense_label(d)}'s", f"{ours:.2f} vs {theirs:.2f}",
                     verdict(ours > theirs), f"{k}/{len(real)}"])
        ours, theirs, _, _ = _versus(g, real, both, n, "acc", drop=True)
        rows.append([f"ACC drop smaller than {defense_label(d)}'s", f"{ours:.2f} vs {theirs:.2f}",
                     verdict(ours < theirs), f"{k}/{len(real)}"])
        if d.partition(":")[0] in TIMED_AGAINST:
            for metric, what, match in (("seconds", "time", None), ("seconds", "time", "cpu"),
                                        ("cpu_seconds", "CPU time", None)):
                ours, theirs, k, cells = _versus(g, real, both, n, metric, match=match)
                if ours is None:
                    continue
                label, measured = f"less {what} than {defense_label(d)}", f"{ours:.1f} s vs {theirs:.1f} s"
                if match:
                    label, measured = label + ", same CPU model", measured + f" ({cells} cell{'s' * (cells != 1)})"
                rows.append([label, measured, verdict(ours < theirs), f"{k}/{len(real)}"])
    rows += timing_rows(sec, timings or [])
    return Table(f"Claims checked: {defense_label(PROPOSED)} against the targets and the other defenses",
                 ["claim", "measured", "verdict", "attacks"], rows,
                 f"Averages over attacks (Benign excluded) of the per-attack mean over seeds; a comparison uses "
                 f"only the (attack, seed) cells both defenses have ({sec.main_size} clean images per class unless "
                 "stated). Seconds: the defense alone, wall-clock under the load the run had; CPU seconds (where both "
                 "cells recorded them): the process's CPU time, which other processes' load does not inflate. Same CPU model: "
                 "only the cells whose records name one and the same processor (records older than that field count "
                 "in the other rows only). One process "
                 "(timing): every defense on the same model and clean set one after the other in one process "
                 "(benchmarks/timing.py, files under the results' timing/), median CPU seconds.")


__all__ = ["PROPOSED", "TARGETS", "TIMED_AGAINST", "claims_table", "load_timings", "timing_rows"]
