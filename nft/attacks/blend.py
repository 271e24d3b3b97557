"""Blend (Chen et al. 2017): x' = (1 - a) x + a P, with P a fixed uniform-noise image (the seed's
choice; drawn from the attack's seed and saved as its artifact)."""
import torch

from ..registry import ATTACKS
from .base import Attack, pattern_generator, PatternArtifact


@ATTACKS.register("blend")
class Blend(PatternArtifact, Attack):
    name = "blend"
    modes = ("all2one", "all2all")

    def __init__(self, alpha: float = 0.2, **kw):
        super().__init__(**kw)
        self.alpha = alpha
        self.pattern = torch.rand(self.image_shape, generator=pattern_generator(self.seed, 2))

    def trigger(self, x):
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x.device)

    def params(self):
        return dict(super().params(), alpha=self.alpha)
