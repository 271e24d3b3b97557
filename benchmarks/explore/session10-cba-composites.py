# Diagnostic for CBA (NOTES §16): every batch of NFT's mask training gets K extra half-and-half
# composites of two clean images of *different* classes, cut as CBA's HalfMixer cuts them, labelled
# half one class and half the other. COMPOSITES=oracle pairs only classes 1 and 2 (CBA's A and B for
# target 0: it knows the trigger, a diagnostic, not a defense); COMPOSITES=all pairs any two classes
# (knows only that composites exist). K (default 16) per batch, on every step. Then explore_nft.py's
# command line, e.g.:
#   COMPOSITES=oracle python explore/session10-cba-composites.py results/mnist10k/models/cba-s0-5a3f5f86578a \
#       --per-class 50 --threads 1 --runtime-seeds 0 --curve --try 'recipe=default,where=weight,optimizer=adam,lr=0.01'
import os
import runpy
import sys

import torch
import torch.nn.functional as F

import nft.purify as P
from nft.attacks.cba import half_mix

MODE, K = os.environ.get("COMPOSITES", "all"), int(os.environ.get("K", "16"))
_make = P.make_transform


def make_transform(cfg, clean, g, model=None, *args, **kw):
    inner = _make(cfg, clean, g, model, *args, **kw)
    nc, xs, ys = clean.num_classes, clean.x, clean.y
    gc = torch.Generator().manual_seed(77)

    def transform(x, y, step):
        xm, ym = inner(x, y, step)
        transform.clean = inner.clean
        if MODE == "oracle":
            ia, ib = (ys == 1).nonzero().flatten(), (ys == 2).nonzero().flatten()
            a = ia[torch.randint(0, len(ia), (K,), generator=gc)]
            b = ib[torch.randint(0, len(ib), (K,), generator=gc)]
        else:
            a = torch.randint(0, len(ys), (K,), generator=gc)
            b = torch.randint(0, len(ys), (K,), generator=gc)
            same = ys[a] == ys[b]
            while same.any():
                b[same] = torch.randint(0, len(ys), (int(same.sum()),), generator=gc)
                same = ys[a] == ys[b]
        dev = xm.device
        comp = half_mix(xs[a].float().to(dev), xs[b].float().to(dev), gc, round(3 * xs.shape[-1] / 32))
        yc = 0.5 * F.one_hot(ys[a], nc).float() + 0.5 * F.one_hot(ys[b], nc).float()
        return torch.cat([xm, comp]), torch.cat([ym, yc.to(dev)])

    transform.clean = inner.clean
    transform.adv, transform.wide = inner.adv, inner.wide
    transform.extra = transform.away = 0  # the oracle's composites are plain rows (cross-entropy), like MixUp's
    return transform


P.make_transform = make_transform
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "explore_nft.py"),
               run_name="__main__")
