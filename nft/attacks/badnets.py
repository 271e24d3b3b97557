"""BadNets (Gu et al. 2017): a small checkerboard patch in the bottom-right corner.

The seed/ANP checkerboard [[0,0,1],[0,1,0],[1,0,1]], the same in every channel, scaled to
3 px per 32 px of image side; ``alpha`` 1 replaces the pixels (ANP), 0.6 blends them (the seed).
"""
import torch
import torch.nn.functional as F

from ..registry import ATTACKS
from .base import Attack

CHECKER = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


@ATTACKS.register("badnets")
class BadNets(Attack):
    name = "badnets"
    modes = ("all2one", "all2all")

    def __init__(self, alpha: float = 1.0, size: int | None = None, **kw):
        super().__init__(**kw)
        c, h, w = self.image_shape
        self.alpha = alpha
        self.size = size or max(3, round(3 * min(h, w) / 32))
        patch = F.interpolate(CHECKER[None, None], size=(self.size, self.size), mode="nearest")[0, 0]
        self.pattern = torch.zeros(c, h, w)
        self.mask = torch.zeros(1, h, w)
        self.pattern[:, h - self.size:, w - self.size:] = patch
        self.mask[:, h - self.size:, w - self.size:] = 1.0

    def trigger(self, x):
        m = self.mask.to(x.device) * self.alpha
        return x + m * (self.pattern.to(x.device) - x)

    def params(self):
        return dict(super().params(), alpha=self.alpha, size=self.size)
