"""Batch augmentations as pure tensor functions: they allocate on the input's device and draw from
the generator they are given (seeded through the Runtime), so runs are reproducible.

Pixels are in [0, 1] throughout. Targets may be class indices or soft (probability) rows; MixUp
returns soft rows, which ``F.cross_entropy`` accepts, so mixed and plain batches share one loss.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def _rand(n, g, device, *shape):
    return torch.rand((n, *shape), generator=g, device=g.device if g is not None else device).to(device)


def _randint(lo, hi, n, g, device):
    return torch.randint(lo, hi, (n,), generator=g, device=g.device if g is not None else device).to(device)


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return y if y.dtype.is_floating_point else F.one_hot(y, num_classes).float()


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float = 1.0, g: torch.Generator | None = None):
    """MixUp (Zhang et al. 2018): one lam ~ Beta(alpha, alpha) per batch and a random pairing.

    Returns (x_mix, y_mix) with y_mix = lam * onehot(y) + (1 - lam) * onehot(y[perm]); then
    CE(f(x_mix), y_mix) == lam * CE(f(x_mix), y) + (1 - lam) * CE(f(x_mix), y[perm]), the seed's loss.
    """
    if alpha <= 0:
        return x, soft_targets(y, num_classes)
    lam, perm = _pairing(len(x), alpha, g, x.device)
    ys = soft_targets(y, num_classes)
    return lam * x + (1 - lam) * x[perm], lam * ys + (1 - lam) * ys[perm]


def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float = 1.0, g: torch.Generator | None = None):
    """CutMix (Yun et al. 2019): one lam ~ Beta(alpha, alpha) per batch and a random pairing; a box
    of area (1 - lam) H W at a uniform random centre (clipped at the border) is pasted from the
    paired image. Labels mix by the area actually pasted: y = a * onehot(y) + (1 - a) * onehot(y[perm]).
    """
    if alpha <= 0:
        return x, soft_targets(y, num_classes)
    lam, perm = _pairing(len(x), alpha, g, x.device)
    gen_device = g.device if g is not None else "cpu"
    H, W = x.shape[-2:]
    r = math.sqrt(1.0 - lam)
    bh, bw = int(round(H * r)), int(round(W * r))
    cy, cx = (int(torch.randint(0, n, (), generator=g, device=gen_device)) for n in (H, W))
    y0, y1 = max(0, cy - bh // 2), min(H, cy - bh // 2 + bh)
    x0, x1 = max(0, cx - bw // 2), min(W, cx - bw // 2 + bw)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    a = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    ys = soft_targets(y, num_classes)
    return out, a * ys + (1 - a) * ys[perm]


def _pairing(n: int, alpha: float, g: torch.Generator | None, device) -> tuple[float, torch.Tensor]:
    """MixUp's and CutMix's draw: lam ~ Beta(alpha, alpha), then a random pairing of the n images."""
    lam = _beta(alpha, g)
    perm = torch.randperm(n, generator=g, device=g.device if g is not None else "cpu").to(device)
    return lam, perm


def _beta(alpha: float, g: torch.Generator | None) -> float:
    """lam ~ Beta(alpha, alpha), drawn from ``g`` (Beta = Ga / (Ga + Gb))."""
    dev = g.device if g is not None else "cpu"
    if alpha == 1.0:  # Beta(1, 1) is uniform
        return float(torch.rand((), generator=g, device=dev))
    ga = torch._standard_gamma(torch.full((2,), float(alpha), device=dev), generator=g)
    return float(ga[0] / ga.sum())


def shift(x: torch.Tensor, max_shift: int, g: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in each axis, filling with zeros."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p))
    dy = _randint(0, 2 * p + 1, n, g, x.device)
    dx = _randint(0, 2 * p + 1, n, g, x.device)
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, :, None]  # n, h, 1
    cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, :]  # n, 1, w
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # n, h, w, c
    return out.permute(0, 3, 1, 2).contiguous()


def flip(x: torch.Tensor, g: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    do = _rand(len(x), g, x.device) < p
    return torch.where(do[:, None, None, None], x.flip(3), x)


def crop(x: torch.Tensor, g: torch.Generator | None = None, pad: int | None = None) -> torch.Tensor:
    """RandomCrop(H, padding=pad) with zero padding; pad defaults to H/8 (4 at 32 px)."""
    return shift(x, pad if pad is not None else max(1, x.shape[-1] // 8), g)


def random_patches(x: torch.Tensor, g: torch.Generator | None = None, p: float = 0.5, min_size: float = 0.07,
                   max_size: float = 0.25) -> torch.Tensor:
    """Overwrite, on each image with probability ``p``, one square of random side (a fraction of the
    image side in [min_size, max_size]) at a uniformly random position with uniform or binary noise.

    It knows nothing of any trigger: it makes clean images excite neurons that clean images leave
    dormant (a corner that is black in every digit, say), so clean gradients reach them.
    """
    n, c, h, w = x.shape
    lo, hi = max(1, round(min_size * h)), max(2, round(max_size * h))
    side = _randint(lo, hi + 1, n, g, x.device)
    top = (_rand(n, g, x.device) * (h - side + 1).float()).long()
    left = (_rand(n, g, x.device) * (w - side + 1).float()).long()
    r = torch.arange(h, device=x.device)[None, :, None]
    cidx = torch.arange(w, device=x.device)[None, None, :]
    inside = (r >= top[:, None, None]) & (r < (top + side)[:, None, None]) & (cidx >= left[:, None, None]) & (
        cidx < (left + side)[:, None, None])
    apply = (_rand(n, g, x.device) < p)[:, None, None] & inside
    noise = _rand(n, g, x.device, c, h, w)
    binary = _rand(n, g, x.device)[:, None, None, None] < 0.5
    noise = torch.where(binary, (noise > 0.5).float(), noise)
    return torch.where(apply[:, None], noise, x)


def affine(x: torch.Tensor, g: torch.Generator | None = None, degrees: float = 12.0,
           scale: tuple[float, float] = (0.9, 1.1), shear: float = 0.15, translate: float = 0.1) -> torch.Tensor:
    """A random affine map per image (rotation, isotropic scale, x-shear, translation as a fraction
    of the side), bilinear, zero fill. More variety than shifts when the clean set is tiny."""
    n = len(x)
    u = lambda lo, hi: lo + (hi - lo) * _rand(n, g, x.device)  # noqa: E731
    a = u(-degrees, degrees) * math.pi / 180
    s = u(*scale)
    sh = u(-shear, shear)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin + sh * cos, 2 * translate * (_rand(n, g, x.device) - 0.5)], 1),
                         torch.stack([sin, cos + sh * sin, 2 * translate * (_rand(n, g, x.device) - 0.5)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def half_mix_jitter(shape) -> int:
    """HalfMixer's jitter for images of ``shape`` (..., H, W): 3 px per 32."""
    return round(3 * min(shape[-2:]) / 32)


def half_mix(xa: torch.Tensor, xb: torch.Tensor, g: torch.Generator, jitter: int) -> torch.Tensor:
    """Float (N, C, H, W) pairs -> half-and-half composites, cut as CBA's HalfMixer cuts them
    (nft.attacks.cba): the two images swapped at random, the split vertical or horizontal at random,
    the first part W/2 + j wide (j uniform in [-jitter, jitter]), each part cut at a random offset of
    up to ``jitter`` px. Scalars are drawn from ``g`` (a CPU generator)."""
    out = torch.empty_like(xa)
    for i in range(len(xa)):
        a, b = (xa[i], xb[i]) if torch.rand((), generator=g) < 0.5 else (xb[i], xa[i])
        vertical = bool(torch.rand((), generator=g) < 0.5)
        if not vertical:
            a, b = a.transpose(1, 2), b.transpose(1, 2)
        w = a.shape[2]
        j = int(torch.randint(-jitter, jitter + 1, (), generator=g)) if jitter else 0
        cut = min(w - 1, max(1, w // 2 + j))
        sa = int(torch.randint(0, jitter + 1, (), generator=g)) if jitter else 0
        sb = int(torch.randint(0, jitter + 1, (), generator=g)) if jitter else 0
        sa, sb = min(sa, w - cut), min(sb, cut)
        o = torch.cat([a[:, :, sa:sa + cut], b[:, :, cut - sb:w - sb]], 2)
        out[i] = o if vertical else o.transpose(1, 2)
    return out


def train_transform(name: str) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """The standard train-time augmentation of a dataset: 'shift' (digits), 'crop', 'crop_flip', 'none',
    or 'affine' / 'affine_flip' (random affine maps, for tiny clean sets)."""
    table = {
        "none": lambda x, g: x,
        "shift": lambda x, g: shift(x, max(1, x.shape[-1] // 14), g),
        "crop": lambda x, g: crop(x, g),
        "crop_flip": lambda x, g: flip(crop(x, g), g),
        "affine": lambda x, g: affine(x, g),
        "affine_flip": lambda x, g: flip(affine(x, g), g),
    }
    if name not in table:
        raise ValueError(f"unknown augmentation {name!r}; choices: {sorted(table)}")
    return table[name]
