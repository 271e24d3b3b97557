"""SIG (Barni et al. 2019), clean-label: a horizontal sine v(j) = delta * sin(2 pi j f / W), the
same in every row and channel, added and clipped. Only target-class training images are poisoned
and they keep their labels; at test time non-target images get the signal and should flip to the
target (f is capped at W/4 cycles for tiny images). BackdoorBench: delta 40/255, f 6, poison rate 0.1 of all data (the whole target class).

``test_delta`` is the amplitude at test time (None: the training ``delta``). Barni et al. keep the
training signal faint (it must pass inspection of correctly labelled images) and use a stronger one
at test time, where the attacker controls the input; the default doubles BB's 40/255 to 80/255.
On mnist10k at 80% of the target class (seed 0 model) ASR was 70.4 at 40/255, 87.6 at 51/255,
93.4 at 64/255, 94.7 at 77/255, 92.4 at 102/255. ``poison_train`` uses ``delta``, ``apply`` ``test_delta``.
"""
import math

import torch

from ..registry import ATTACKS
from .base import Attack


@ATTACKS.register("sig")
class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, delta: float = 40 / 255, freq: float = 6, test_delta: float | None = 80 / 255, **kw):
        super().__init__(**kw)
        self.delta, self.freq, self.test_delta = delta, freq, test_delta
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float32)
        f = min(freq, w / 4)  # tiny images: at most W/4 cycles, or the samples land on the zeros of the sine
        self.wave = torch.sin(2 * math.pi * j * f / w).expand(c, h, w).contiguous()
        self.pattern = delta * self.wave
        self._amp = delta

    def trigger(self, x):
        return x + (self._amp * self.wave).to(x.device)

    def apply(self, images, labels):
        self._amp = self.delta if self.test_delta is None else self.test_delta
        try:
            return super().apply(images, labels)
        finally:
            self._amp = self.delta

    def params(self):
        return dict(super().params(), delta=self.delta, freq=self.freq, test_delta=self.test_delta)
