"""SIG (Barni et al. 2019), clean-label: a horizontal sine v(j) = delta * sin(2 pi j f / W), the
same in every row and channel, added and clipped. Only target-class training images are poisoned
and they keep their labels; at test time non-target images get the signal and should flip to the
target (f is capped at W/4 cycles for tiny images). BackdoorBench: delta 40/255, f 6, poison rate 0.1 of all data (the whole target class).
"""
import math

import torch

from ..registry import ATTACKS
from .base import Attack


@ATTACKS.register("sig")
class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, delta: float = 40 / 255, freq: float = 6, **kw):
        super().__init__(**kw)
        self.delta, self.freq = delta, freq
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float32)
        f = min(freq, w / 4)  # tiny images: at most W/4 cycles, or the samples land on the zeros of the sine
        self.pattern = (delta * torch.sin(2 * math.pi * j * f / w)).expand(c, h, w).contiguous()

    def trigger(self, x):
        return x + self.pattern.to(x.device)

    def params(self):
        return dict(super().params(), delta=self.delta, freq=self.freq)
