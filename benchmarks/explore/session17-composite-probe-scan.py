"""Session 17 (NOTES §21): what searches.composite_probe flags at one image per class on the CBA models, for four
clean picks, with the two images of a pair used as they are, or each part augmented (affine / shift) before the cut.

    python benchmarks/explore/session17-composite-probe-scan.py runs/g/models/cba-s*[0-9a-f]

(the augmentation is patched in around searches.half_mix here; the library's probe has no such option: it did not
change which pair is flagged, so it was not kept)."""
import sys

import torch

from nft import augment as A
from nft import searches
from nft.io import load_model
from nft.runs import clean_set, dataset_of

torch.set_num_threads(1)
plain = searches.half_mix
for run in sys.argv[1:]:
    model, man = load_model(run)
    data = dataset_of(man)
    for cs in range(4):
        clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=1, seed=cs)
        out = []
        for name in (None, "affine", "shift"):
            part = A.train_transform(name) if name else None
            searches.half_mix = (lambda xa, xb, g, j: plain(part(xa, g), part(xb, g), g, j)) if part else plain
            p = searches.composite_probe(model, clean.x, clean.y, 10, 64, 0.7, torch.Generator().manual_seed(707), 2.0)
            out.append((name, [(a, b, c, round(s, 2)) for a, b, c, s in p["pairs"]][:3], round(p["median"], 2)))
        searches.half_mix = plain
        print(run.rstrip("/").split("/")[-1], "clean seed", cs, out, flush=True)
