"""nft show-attack NAME: a PNG grid of clean test images, their triggered versions and the residual.

With ``--run RUN_DIR`` the attack (and its learned trigger, generator or encoder) comes from a run
directory; otherwise it is built for ``--dataset`` and fitted there if it needs fitting (generators
that train jointly with a victim, like LIRA's, are shown untrained then).
"""
from __future__ import annotations

import json

import torch

from ..attacks import build_attack
from ..attacks.base import fit_attack
from ..data.core import to_float
from ..errors import NFTError
from ..registry import ATTACKS, DATASETS
from .common import add_runtime_args, runtime_from


def add_parser(sub):
    p = sub.add_parser("show-attack", help="picture an attack: clean, triggered and residual images")
    p.add_argument("attack", nargs="?", default=None, help=f"one of {ATTACKS.names()} (omit with --run)")
    p.add_argument("--run", default=None, help="take the attack and its artifact from this run directory")
    p.add_argument("--dataset", default="mnist10k", help=f"one of {DATASETS.names()}")
    p.add_argument("--data-root", default=None)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--label-mode", default="all2one", choices=["all2one", "all2all"])
    p.add_argument("-n", "--num", type=int, default=8, help="images to show")
    p.add_argument("--out", default=None, help="PNG path (default: attack-NAME.png)")
    add_runtime_args(p)
    return p


def _attack_and_data(args, rt):
    from ..runs import attack_from_run, read_dataset

    if args.run:
        from ..io import read_manifest

        manifest = read_manifest(args.run)
        attack = attack_from_run(args.run, manifest)
        if attack is None:
            raise NFTError(f"{args.run} is a benign run: it records no attack")
        if args.attack and args.attack.lower() != attack.name:
            raise NFTError(f"{args.run} records attack {attack.name!r}, not {args.attack!r}")
        return attack, read_dataset(manifest["dataset"], root=args.data_root, **manifest.get("dataset_kwargs", {}))
    if not args.attack:
        raise NFTError("name an attack or pass --run RUN_DIR")
    data = read_dataset(args.dataset, root=args.data_root)
    attack = build_attack(args.attack, num_classes=data.num_classes, image_shape=data.input_shape,
                          target=args.target, mode=args.label_mode, seed=args.seed)
    fit_attack(attack, data, rt)
    return attack, data


def picture(attack, x: torch.Tensor, y: torch.Tensor, path: str, classes=None, triggered=None) -> str:
    """Three rows: clean images, triggered images, residual (mid-gray = unchanged, scaled per image).
    ``triggered`` = (images, backdoor labels) when they are not ``attack.apply(x, y)`` (CBA's composites)."""
    from ..plots import plt

    xt, yt = triggered if triggered is not None else attack.apply(x, y)
    xf, xtf = to_float(x), to_float(xt)
    res = xtf - xf
    scale = res.flatten(1).abs().max(1).values.clamp_min(1e-8).view(-1, 1, 1, 1)
    res_img = (0.5 + 0.5 * res / scale).clamp(0, 1)
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.4), dpi=110, squeeze=False)
    name = lambda c: classes[c] if classes and c < len(classes) else str(c)  # noqa: E731
    for i in range(n):
        for row, img, title in ((0, xf[i], f"{name(int(y[i]))}"), (1, xtf[i], f"-> {name(int(yt[i]))}"),
                                (2, res_img[i], f"max {float(scale[i]) * 255:.0f}/255")):
            ax = axes[row][i]
            im = img.permute(1, 2, 0).numpy()
            ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    for row, label in enumerate(("clean", "triggered", "residual")):
        axes[row][0].text(-0.15, 0.5, label, transform=axes[row][0].transAxes, rotation=90, va="center",
                          ha="right", fontsize=8)
    fig.suptitle(f"{attack.name} ({attack.mode}, target {attack.target})", fontsize=9)
    fig.tight_layout()
    import io

    from ..io import _atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write(path, buf.getvalue())
    plt.close(fig)
    return path


def run(args) -> int:
    if args.num < 1:
        raise NFTError("--num must be at least 1")
    rt = runtime_from(args)
    attack, data = _attack_and_data(args, rt)
    path = args.out or f"attack-{attack.name}.png"
    if hasattr(attack, "test_set"):  # CBA: the A image beside its A+B composite
        xt, yt, ytrue = (t[:args.num] for t in attack.test_set(data.test))
        first = (data.test.y == ytrue[0]).nonzero().flatten()[:len(ytrue)]
        picture(attack, data.test.x[first], ytrue, path, data.classes, triggered=(xt, yt))
    else:
        keep = attack.eligible(data.test.y).nonzero().flatten()[:args.num]
        picture(attack, data.test.x[keep], data.test.y[keep], path, data.classes)
    print(json.dumps({"out": path, "attack": attack.name, "params": attack.params()}))
    return 0
