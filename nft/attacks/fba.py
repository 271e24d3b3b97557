"""FBA, feature-space backdoor. The benchmark's FBA is DFST (Cheng et al. AAAI 2021): a CycleGAN
that repaints images in a "sunrise" style, plus detoxification rounds. This is a **from-scratch
substitute** (no CycleGAN, no detoxification), as the spec allows: a fixed, smooth, global style
transform that touches every pixel and has no patch to find:

    x' = clip( blur(x) ** gamma * gain_c + glow(row) * tint_c )

gamma < 1 lifts mid-tones, ``gain``/``tint`` push colour images toward warm tones (for one channel
they are scalars), and ``glow`` is a soft light rising from the bottom edge like a sunrise
(strength ``glow`` at the bottom row, 0 at the top). The blur is a 3x3 binomial filter. all2one.
"""
import torch
import torch.nn.functional as F

from ..registry import ATTACKS
from .base import Attack

WARM_GAIN = (1.1, 0.95, 0.8)  # R, G, B
WARM_TINT = (1.0, 0.6, 0.2)


@ATTACKS.register("fba")
class FeatureStyle(Attack):
    name = "fba"

    def __init__(self, gamma: float = 0.7, glow: float = 0.25, blur: bool = True, **kw):
        super().__init__(**kw)
        self.gamma, self.glow, self.blur = gamma, glow, blur
        c, h, _ = self.image_shape
        gain = WARM_GAIN if c == 3 else (1.0,) * c
        tint = WARM_TINT if c == 3 else (1.0,) * c
        self.gain = torch.tensor(gain).view(c, 1, 1)
        ramp = torch.linspace(0, 1, h) ** 2  # 0 at the top row, 1 at the bottom
        self.light = glow * ramp.view(1, h, 1) * torch.tensor(tint).view(c, 1, 1)

    def trigger(self, x):
        if self.blur:
            k = torch.tensor([1.0, 2.0, 1.0], device=x.device)
            k = (k[:, None] * k[None]) / 16
            c = x.shape[1]
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3).contiguous(), groups=c)
        x = x.clamp(0, 1) ** self.gamma
        return x * self.gain.to(x.device) + self.light.to(x.device)

    def params(self):
        return dict(super().params(), gamma=self.gamma, glow=self.glow, blur=self.blur)
