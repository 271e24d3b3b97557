"""The report's plots (matplotlib, Agg, PNG), from records and saved artifacts only.

- grouped bars of ASR and ACC per attack and defense;
- ACC/ASR along purification (the history the bench's monitor logged);
- sample efficiency: ASR/ACC against clean images per class;
- runtime and peak memory per defense;
- the trade-off: each defense's average ASR after against its average ACC drop (Table 1's Avg. Drop);
- t-SNE of penultimate features before and after purification (the paper's Fig. 1), from the
  backdoored model cached under models/ and the purified model the bench kept under artifacts/.
"""
from __future__ import annotations

import itertools
import os
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .records import BENIGN, NO_DEFENSE  # noqa: E402
from .report import (Section, attack_label, avg_after, avg_drop, cell_stats, defense_label,  # noqa: E402
                     efficiency_rows, group)
from .report_claims import PROPOSED  # noqa: E402


def write_png(fig, path: str) -> str:
    """Render ``fig`` to PNG and write it via a temporary file + rename (no half-written image)."""
    import io
    import tempfile

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _save(fig, path: str) -> str:
    fig.tight_layout()
    return write_png(fig, path)


def _colors(defenses: list[str]) -> dict[str, str]:
    """No Defense grey, NFT ``default`` (the method under test) black, the others from a qualitative map."""
    others = [d for d in defenses if d not in (NO_DEFENSE, PROPOSED)]
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    return {NO_DEFENSE: "0.45", PROPOSED: "black", **{d: cmap(i % cmap.N) for i, d in enumerate(others)}}


def bars(sec: Section, path: str) -> str:
    g = group(sec.records)
    colors = _colors(sec.defenses)
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(sec.attacks) + 3), 3.8), dpi=110)
    width = 0.8 / max(1, len(sec.defenses))
    for ax, m in zip(axes, ("asr", "acc")):
        for j, d in enumerate(sec.defenses):
            xs, ys, es = [], [], []
            for i, a in enumerate(sec.attacks):
                mu, sd, n = cell_stats(g, a, d, sec.main_size, m)
                if n:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(mu)
                    es.append(sd if n > 1 else 0)
            ax.bar(xs, ys, width, yerr=es, color=colors[d], label=defense_label(d), capsize=2)
        ax.set_xticks(range(len(sec.attacks)), [attack_label(a) for a in sec.attacks], rotation=20)
        ax.set_ylabel(f"{m.upper()} %")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{m.upper()} ({'lower' if m == 'asr' else 'higher'} is better)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def purification(sec: Section, path: str) -> str | None:
    """ACC (solid) and ASR (dashed) against the defense's step, mean over seeds, one panel per attack."""
    curves = defaultdict(lambda: defaultdict(list))  # (attack, defense) -> step -> [(acc, asr)]
    for r in sec.records:
        if r["defense"] != NO_DEFENSE and r.get("clean_per_class") == sec.main_size and r.get("history"):
            for h in r["history"]:
                if "step" in h and "acc" in h:  # evaluation points on a step axis (I-BAU/AWM count rounds)
                    curves[(r["attack"], r["defense"])][h["step"]].append((h.get("acc"), h.get("asr")))
    if not curves:
        return None
    attacks = [a for a in sec.attacks if any(k[0] == a for k in curves)]
    colors = _colors(sec.defenses)
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks) + 0.6, 3.4), dpi=110, squeeze=False)
    for ax, a in zip(axes[0], attacks):
        for d in sec.defenses:
            pts = curves.get((a, d))
            if not pts:
                continue
            steps = sorted(pts)
            acc = [statistics.fmean(v[0] for v in pts[s]) for s in steps]
            mk = "o" if len(steps) < 3 else None  # a defense that logged only its end point still shows
            ax.plot(steps, acc, "-", marker=mk, color=colors[d], label=f"{defense_label(d)} ACC")
            if all(v[1] is not None for s in steps for v in pts[s]):
                asr = [statistics.fmean(v[1] for v in pts[s]) for s in steps]
                ax.plot(steps, asr, "--", marker=mk, color=colors[d], label=f"{defense_label(d)} ASR")
        ax.set_title(attack_label(a))
        ax.set_xlabel("defense step")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("% (ACC solid, ASR dashed)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def sample_efficiency(sec: Section, path: str) -> str | None:
    rows = efficiency_rows(sec)
    if not rows:
        return None
    colors = _colors(sec.defenses)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=110)
    for ax, k, name in ((axes[0], 2, "ASR"), (axes[1], 3, "ACC")):
        for d in sec.defenses:
            pts = [(r[1], r[k]) for r in rows if r[0] == d]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o",
                            color=colors[d], label=defense_label(d), capsize=2)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sec.sizes, [str(s) for s in sec.sizes])
        ax.set_xlabel("clean images per class")
        ax.set_ylabel(f"{name} %")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def runtime(sec: Section, path: str) -> str | None:
    defs = [d for d in sec.defenses if d != NO_DEFENSE]
    g = group(sec.records)
    stats = {}
    for d in defs:
        recs = [r for a in sec.attacks for r in g.get((a, d, sec.main_size), [])]
        secs = [r["seconds"] for r in recs if r.get("seconds") is not None]
        mem = [r["peak_mb"] for r in recs if r.get("peak_mb") is not None]
        if secs:
            stats[d] = (statistics.fmean(secs), statistics.pstdev(secs), statistics.fmean(mem) if mem else 0.0)
    if not stats:
        return None
    colors = _colors(sec.defenses)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
    names = list(stats)
    axes[0].bar(range(len(names)), [stats[d][0] for d in names], yerr=[stats[d][1] for d in names],
                color=[colors[d] for d in names], capsize=3)
    axes[0].set_ylabel("seconds per cell")
    axes[1].bar(range(len(names)), [stats[d][2] for d in names], color=[colors[d] for d in names])
    axes[1].set_ylabel("peak memory (MB)")
    for ax in axes:
        ax.set_xticks(range(len(names)), [defense_label(d) for d in names], rotation=15)
        ax.grid(axis="y", alpha=0.3)
    devices = sorted({r.get("device", "?") for r in sec.records})
    fig.suptitle(f"cost per defense ({sec.main_size} clean/class; {', '.join(devices)})", fontsize=9)
    return _save(fig, path)


def tradeoff(sec: Section, path: str) -> str | None:
    """Average ASR after (x) against average ACC drop (y), one point per defense at the main clean-set size
    (and the proposed recipe at its other sizes, hollow shapes): a defense that removes nothing sits far right at a
    small ACC drop, so the ACC-drop column alone does not rank defenses. Lower left is better."""
    g = group(sec.records)
    colors = _colors(sec.defenses)
    pts = []  # (defense, size, x, xerr, y, yerr)
    for d in sec.defenses:
        if d == NO_DEFENSE:
            continue
        for n in (sec.sizes if d == PROPOSED else [sec.main_size]):
            x, xe, _ = avg_after(g, sec.attacks, d, n, "asr")
            y, ye, _ = avg_drop(g, sec.attacks, d, n, "acc")
            if x is not None and y is not None:
                pts.append((d, n, x, xe, y, ye))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.6, 4.4), dpi=110)
    shapes = itertools.cycle("^sDvP*X")
    for d, n, x, xe, y, ye in pts:
        main = n == sec.main_size
        ax.errorbar([x], [y], xerr=[xe or 0], yerr=[ye or 0], marker="o" if main else next(shapes), ms=7, capsize=2,
                    color=colors[d], mfc=colors[d] if main else "white", ls="none",
                    label=defense_label(d) if main else f"{defense_label(d)}, {n}/class")
    ax.set_xlabel("average ASR after defense, % (lower is better)")
    ax.set_ylabel("average ACC drop, points (lower is better)")
    ax.set_xlim(-3, 103)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.grid(alpha=0.3)
    ax.set_title(f"trade-off over {len([a for a in sec.attacks if a != BENIGN])} attacks "
                 f"({sec.main_size} clean/class; hollow: other sizes)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def section_plots(sec: Section, results: str, out: str, tag: str, tsne_samples: int = 600) -> list[tuple[str, str]]:
    """Every plot of a section: [(path, caption)]."""
    figs = []
    for fn, name, cap in ((bars, "bars", "ASR and ACC per attack and defense"),
                          (purification, "purification", "ACC and ASR along purification"),
                          (sample_efficiency, "sample_efficiency", "ASR and ACC against clean images per class"),
                          (runtime, "runtime", "time and peak memory per defense"),
                          (tradeoff, "tradeoff", "average ASR after against average ACC drop per defense")):
        p = fn(sec, os.path.join(out, f"{tag}_{name}.png"))
        if p:
            figs.append((p, f"{sec.name}: {cap}"))
    from .report_tsne import tsne_plots

    figs += tsne_plots(sec, results, out, tag, tsne_samples)
    return figs


__all__ = ["bars", "purification", "sample_efficiency", "runtime", "tradeoff", "section_plots", "BENIGN"]
