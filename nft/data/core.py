"""In-memory image data: uint8 storage, float [0, 1] views, stratified picks, the CleanSet."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import NFTError


@dataclass
class ImageData:
    """Images as uint8 (N, C, H, W) and int64 labels. ``floats()`` gives pixels in [0, 1]."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.dim() != 4:
            raise NFTError(f"images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise NFTError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "ImageData":
        return ImageData(self.x[index], self.y[index])

    def floats(self) -> torch.Tensor:
        return to_float(self.x)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantize [0, 1] floats to 8 bits, as an image file would."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


@dataclass
class DatasetSplits:
    """A dataset as the toolkit sees it.

    ``train`` is what a model trains on (the attacker may poison it); ``heldout`` is the
    defender's pool of clean images, disjoint from ``train``; ``test`` is for evaluation only.
    """

    name: str
    train: ImageData
    heldout: ImageData
    test: ImageData
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "crop_flip"  # the train-time augmentation in pixel space (see nft.augment)
    classes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


def stratified_pick(
    y: torch.Tensor,
    num_classes: int,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a class-balanced sample: ``per_class`` images of each class, or ``fraction`` of each.

    Raises NFTError when a class is missing or has fewer images than asked for.
    """
    if (per_class is None) == (fraction is None):
        raise NFTError("give exactly one of per_class or fraction")
    if per_class is not None and per_class < 1:
        raise NFTError(f"per-class count must be >= 1, got {per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise NFTError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) == 0:
            raise NFTError(f"class {c} has no images in the clean pool")
        k = per_class if per_class is not None else max(1, round(fraction * len(idx)))
        if k > len(idx):
            raise NFTError(f"asked for {k} images of class {c} but only {len(idx)} exist")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked).sort().values


def holdout_split(y: torch.Tensor, num_classes: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train, heldout), holding out ``fraction`` of every class."""
    held = stratified_pick(y, num_classes, fraction=fraction, seed=seed)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held


@dataclass
class CleanSet:
    """The defender's small clean data: float images in [0, 1] (N, C, H, W) and labels.

    A defense receives only this. ``augment`` names the train-time augmentation that suits the
    images (flips are wrong for digits).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    augment: str = "crop_flip"

    def __post_init__(self):
        if self.x.dtype == torch.uint8:
            self.x = to_float(self.x)
        if self.x.dim() != 4:
            raise NFTError(f"clean images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise NFTError(f"{len(self.x)} clean images but {len(self.y)} labels")
        if len(self.y) < self.num_classes:
            raise NFTError(f"the clean set has {len(self.y)} images, fewer than its {self.num_classes} classes")
        missing = sorted(set(range(self.num_classes)) - set(self.y.tolist()))
        if missing:
            raise NFTError(f"the clean set has no image of class {missing[0]}" + (f" (nor {missing[1:]})" if missing[1:] else ""))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def per_class(self) -> float:
        """N_c: samples per class (the seed's L1 normaliser)."""
        return len(self.y) / self.num_classes

    @classmethod
    def pick(cls, pool: ImageData, num_classes: int, per_class=None, fraction=None, seed=0, augment="crop_flip"):
        idx = stratified_pick(pool.y, num_classes, per_class, fraction, seed)
        return cls(pool.x[idx], pool.y[idx], num_classes, augment)
