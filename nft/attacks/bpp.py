"""BppAttack (Wang et al., CVPR 2022): colour-depth squeezing as the trigger.

Q(x) = round(x * (s - 1)) / (s - 1) per channel, s = ``squeeze`` levels (8 = 3 bits), optionally
with Floyd-Steinberg error diffusion (weights 7/16, 3/16, 5/16, 1/16). Per batch inside training,
the first rate*B samples are squeezed and relabelled; the next ``neg_ratio`` * rate*B are negatives
that keep their label: x + (Q(x_r) - x_r), the quantization residual of another image of the batch
(the paper's contrastive negatives, as in BackdoorBench).

Dithering is off by default in both reference repos; it is on here (``dither=False`` for the paper).
``squeeze`` defaults to the paper's 8 levels for colour images but 3 for one-channel images: digits
have few mid-tones, and on mnist10k (PreActResNet-18 w16, 8 epochs, 10%) 8 levels gave 0.3% ASR.
The error diffusion runs as a wavefront (pixels with equal 2*row + col are independent), so it
costs 2H + W vectorised steps, not H*W.
"""
import torch

from ..registry import ATTACKS
from .common import OnTheFlyAttack


def quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(x * (levels - 1)) / (levels - 1)


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    n, c, h, w = x.shape
    err = torch.zeros(n, c, h + 1, w + 2, dtype=x.dtype, device=x.device)  # padded error buffer
    out = torch.empty_like(x)
    rows = torch.arange(h, device=x.device)
    for t in range(2 * (h - 1) + w):
        cols = t - 2 * rows
        ok = (cols >= 0) & (cols < w)
        r, q = rows[ok], cols[ok]
        if not len(r):
            continue
        v = x[:, :, r, q] + err[:, :, r, q + 1]
        o = quantize(v.clamp(0, 1), levels)
        e = v - o
        out[:, :, r, q] = o
        err[:, :, r, q + 2] += e * 7 / 16
        err[:, :, r + 1, q] += e * 3 / 16
        err[:, :, r + 1, q + 1] += e * 5 / 16
        err[:, :, r + 1, q + 2] += e * 1 / 16
    return out


@ATTACKS.register("bpp")
class BppAttack(OnTheFlyAttack):
    name = "bpp"
    modes = ("all2one", "all2all")

    def __init__(self, squeeze: int | None = None, dither: bool = True, neg_ratio: float = 1.0, **kw):
        super().__init__(**kw)
        squeeze = squeeze or (8 if self.image_shape[0] >= 3 else 3)
        self.squeeze, self.dither, self.neg_ratio = squeeze, dither, neg_ratio

    def trigger(self, x):
        return floyd_steinberg(x, self.squeeze) if self.dither else quantize(x, self.squeeze)

    def negative(self, x, g):
        perm = torch.randperm(len(x), generator=g).to(x.device)
        xr = x[perm]
        return x + (self.trigger(xr) - xr)

    def params(self):
        return dict(super().params(), squeeze=self.squeeze, dither=self.dither, neg_ratio=self.neg_ratio)
