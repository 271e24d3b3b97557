"""Trojan one-to-one / all-to-all (Troj-one, Troj-all in the NFT benchmark): the seed's fixed 3x3
colour patch, *added* to the image near the bottom-right corner and clipped (the clip happens in
float, before any uint8 cast, so nothing wraps around as in the seed/BackdoorBench code).

The seed ships its patch as a file; here it is drawn once from the attack's seed (every cell in
[0.5, 1] so it stays visible after the clip) and saved as the attack artifact. Side 3 px per 32 px,
4 px (scaled) from the bottom-right edge: rows/cols 25-27 at 32 px.
"""
import torch

from ..errors import NFTError
from ..registry import ATTACKS
from .base import Attack, pattern_generator, PatternArtifact


@ATTACKS.register("trojan")
class Trojan(PatternArtifact, Attack):
    name = "trojan"
    modes = ("all2one", "all2all")

    def __init__(self, size: int | None = None, margin: int | None = None, **kw):
        super().__init__(**kw)
        c, h, w = self.image_shape
        self.size = size or max(3, round(3 * min(h, w) / 32))
        self.margin = margin if margin is not None else round(4 * min(h, w) / 32)
        if self.size + self.margin > min(h, w):
            raise NFTError(f"trojan patch ({self.size} px, margin {self.margin}) does not fit {h}x{w} images")
        cells = 0.5 + 0.5 * torch.rand(c, 3, 3, generator=pattern_generator(self.seed, 3))
        patch = torch.nn.functional.interpolate(cells[None], size=(self.size, self.size), mode="nearest")[0]
        self.pattern = torch.zeros(c, h, w)
        r0, c0 = h - self.margin - self.size, w - self.margin - self.size
        self.pattern[:, r0:r0 + self.size, c0:c0 + self.size] = patch

    def trigger(self, x):
        return x + self.pattern.to(x.device)

    def params(self):
        return dict(super().params(), size=self.size, margin=self.margin)
