"""t-SNE of penultimate features before and after purification (the paper's Fig. 1).

Uses only saved artifacts: the backdoored model the bench cached (models/<key>/) and the purified
model it kept for the cell (artifacts/<cell>/purified/, by default for the first seed and the first
clean-set size). Clean test images are coloured by class; triggered images get a colour of their own.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .records import BENIGN, NO_DEFENSE, ModelSpec  # noqa: E402
from .report import Section, attack_label, defense_label  # noqa: E402


def _pick_defense(recs: list[dict]) -> str | None:
    have = sorted({r["defense"] for r in recs})
    for pref in ("nft:default", "nft"):
        if pref in have:
            return pref
    return next((d for d in have if d.startswith("nft")), have[0] if have else None)


def _tsne_cells(sec: Section, results: str) -> list[dict]:
    """One record per attack (not Benign) whose purified model was kept, preferring NFT's default."""
    kept = [r for r in sec.records if r["defense"] != NO_DEFENSE and r["attack"] != BENIGN
            and r.get("clean_per_class") == sec.main_size and (r.get("artifacts") or {}).get("purified")
            and os.path.isfile(os.path.join(results, r["artifacts"]["purified"], "manifest.json"))
            and os.path.isfile(os.path.join(results, r["artifacts"].get("backdoored", ""), "manifest.json"))]
    out = []
    for a in sec.attacks:
        recs = [r for r in kept if r["attack"] == a]
        d = _pick_defense(recs)
        if d:
            out.append(min((r for r in recs if r["defense"] == d), key=lambda r: r["seed"]))
    return out


@torch.inference_mode()
def _features(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(x[i:i + batch]).flatten(1) for i in range(0, len(x), batch)])


def embed(rec: dict, results: str, n_samples: int = 600):
    """(2-D before, 2-D after, labels, is_poisoned) for one record's cell."""
    from sklearn.manifold import TSNE

    from .bench import data_for
    from .data.core import to_float
    from .evaluate import poisoned_test_set
    from .io import load_model
    from .runs import attack_from_run

    bdir = os.path.join(results, rec["artifacts"]["backdoored"])
    before, manifest = load_model(bdir)
    after, _ = load_model(os.path.join(results, rec["artifacts"]["purified"]))
    data = data_for(ModelSpec(**rec["config"]["model"]))
    attack = attack_from_run(bdir, manifest)
    g = torch.Generator().manual_seed(0)
    n_clean, n_poison = n_samples - n_samples // 5, n_samples // 5
    ci = torch.randperm(len(data.test), generator=g)[:n_clean]
    xp, _, _ = poisoned_test_set(data.test, attack)
    pi = torch.randperm(len(xp), generator=g)[:n_poison]
    x = torch.cat([to_float(data.test.x[ci]), to_float(xp[pi])])
    labels = torch.cat([data.test.y[ci], torch.full((len(pi),), -1)])
    poisoned = torch.cat([torch.zeros(len(ci), dtype=torch.bool), torch.ones(len(pi), dtype=torch.bool)])
    out = []
    for model in (before, after):
        f = _features(model, x).double().numpy()
        perplexity = min(30.0, max(2.0, (len(f) - 1) / 3.5))
        out.append(TSNE(2, init="pca", perplexity=perplexity, random_state=0).fit_transform(f))
    return out[0], out[1], labels.numpy(), poisoned.numpy(), getattr(attack, "target", None)


def tsne_figure(rec: dict, results: str, path: str, n_samples: int = 600) -> str:
    from .report_plots import write_png

    e_before, e_after, labels, poisoned, target = embed(rec, results, n_samples)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=110)
    cmap = plt.get_cmap("tab10")
    titles = (f"backdoored (ASR {rec['before'].get('asr', 0):.1f}%)",
              f"after {defense_label(rec['defense'])} (ASR {rec['asr']:.1f}%)")
    for ax, e, title in zip(axes, (e_before, e_after), titles):
        clean = ~poisoned
        ax.scatter(e[clean, 0], e[clean, 1], c=[cmap(int(c) % 10) for c in labels[clean]], s=6, alpha=0.7)
        ax.scatter(e[poisoned, 0], e[poisoned, 1], c="black", marker="x", s=14, linewidths=0.8,
                   label="triggered" + (f" (target {target})" if target is not None else ""))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"t-SNE of penultimate features: {attack_label(rec['attack'])}, seed {rec['seed']}, "
                 f"{rec['clean_per_class']} clean/class (colour: true class)", fontsize=9)
    fig.tight_layout()
    return write_png(fig, path)


def tsne_plots(sec: Section, results: str, out: str, tag: str, n_samples: int = 600) -> list[tuple[str, str]]:
    """One t-SNE figure per attack with kept artifacts. Where the artifacts are gone (e.g. a
    committed results directory without models), an earlier figure is kept and listed."""
    figs, done = [], set()
    if n_samples > 0:
        for rec in _tsne_cells(sec, results):
            path = os.path.join(out, f"{tag}_tsne_{rec['attack']}.png")
            figs.append((tsne_figure(rec, results, path, n_samples),
                         f"{sec.name}: t-SNE before/after {defense_label(rec['defense'])}, {rec['attack']}"))
            done.add(rec["attack"])
    for a in sec.attacks:
        path = os.path.join(out, f"{tag}_tsne_{a}.png")
        if a not in done and os.path.isfile(path):
            figs.append((path, f"{sec.name}: t-SNE, {a} (from an earlier report; artifacts not present now)"))
    return figs
