"""Plots (matplotlib, Agg backend): written to PNG files."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def purification_curve(history: list[dict], path: str, title: str = "NFT purification") -> str:
    """ACC and ASR (and the loss) against the optimizer step."""
    pts = [h for h in history if "acc" in h]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if pts:
        steps = [h["step"] for h in pts]
        ax.plot(steps, [h["acc"] for h in pts], "o-", label="ACC (clean test)", color="tab:blue")
        if "asr" in pts[0]:
            ax.plot(steps, [h["asr"] for h in pts], "s-", label="ASR (triggered, non-target)", color="tab:red")
    ax.set_xlabel("mask optimizer step")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    losses = [h for h in history if "loss" in h]
    if losses:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in losses], [h["loss"] for h in losses], color="gray", alpha=0.5, lw=1, label="loss")
        ax2.set_ylabel("training loss", color="gray")
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    from .io import _atomic_write

    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
