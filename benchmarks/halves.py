"""The test set cut in two fixed halves, for developing NFT recipes without choosing on test data.

``dev`` is where settings are compared (benchmarks/explore_nft.py --eval dev); ``report`` is where
benchmarks/nft_table.py judges the targets. The cut is a stratified permutation with a fixed seed,
the same for every model of a dataset, so a setting chosen on ``dev`` is never scored on its images.
"""
import torch

from nft.data.core import ImageData

SEED = 20261124


def halves(test: ImageData, num_classes: int) -> tuple[ImageData, ImageData]:
    """(dev, report): every class split as evenly as it can be (the odd image goes to report)."""
    counts = torch.bincount(test.y, minlength=num_classes)
    dev = torch.zeros(len(test), dtype=torch.bool)
    g = torch.Generator().manual_seed(SEED)
    for c in range(num_classes):
        idx = (test.y == c).nonzero().flatten()
        dev[idx[torch.randperm(len(idx), generator=g)[: int(counts[c]) // 2]]] = True
    return test.subset(dev.nonzero().flatten()), test.subset((~dev).nonzero().flatten())
