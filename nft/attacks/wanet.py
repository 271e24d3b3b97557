"""WaNet (Nguyen & Tran, ICLR 2021): a fixed, smooth, almost invisible warp of the image.

The warp field is drawn once: U ~ U[-1, 1]^(2, k, k), divided by mean|U|, upsampled bicubically to
H x W; grid = clamp(identity + s * U / H, -1, 1); x' = grid_sample(x, grid, bilinear, align_corners).
Poisoning happens per batch inside the training loop (``train_hooks``): the first rate*B samples are
warped and relabelled, the next ``cross_ratio`` * rate*B are "noise mode" samples, warped with the
field plus per-sample random noise V/H (V ~ U[-1, 1]^(H, W, 2)) and keeping their true label, so
the model must learn this exact warp and not warping in general.

Defaults: k 4, s 0.5, cross_ratio 2 (the paper); the shared 8 epochs suffice on mnist10k.
"""
import torch
import torch.nn.functional as F

from ..errors import NFTError
from ..registry import ATTACKS
from .base import pattern_generator
from .common import OnTheFlyAttack


@ATTACKS.register("wanet")
class WaNet(OnTheFlyAttack):
    name = "wanet"
    modes = ("all2one", "all2all")

    def __init__(self, k: int = 4, s: float = 0.5, cross_ratio: float = 2.0, grid_rescale: float = 1.0, **kw):
        super().__init__(**kw)
        self.k, self.s, self.cross_ratio, self.grid_rescale = k, s, cross_ratio, grid_rescale
        self.neg_ratio = cross_ratio
        _, h, w = self.image_shape
        u = torch.rand(1, 2, k, k, generator=pattern_generator(self.seed, 5)) * 2 - 1
        self.noise_grid = u / u.abs().mean()
        self.field = self._field()

    def _field(self):
        _, h, w = self.image_shape
        up = F.interpolate(self.noise_grid, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack([xs, ys], -1)[None]  # grid_sample wants (x, y)
        return ((identity + self.s * up / h) * self.grid_rescale).clamp(-1, 1)

    def trigger(self, x):
        grid = self.field.to(x.device).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def negative(self, x, g):
        n, _, h, w = x.shape
        v = torch.rand(n, h, w, 2, generator=g).to(x.device) * 2 - 1
        grid = (self.field.to(x.device) + v / h).clamp(-1, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def params(self):
        return dict(super().params(), k=self.k, s=self.s, cross_ratio=self.cross_ratio, grid_rescale=self.grid_rescale)

    def state_dict(self):
        return {"noise_grid": self.noise_grid}

    def load_state_dict(self, state):
        if set(state) != {"noise_grid"} or tuple(state["noise_grid"].shape) != (1, 2, self.k, self.k):
            raise NFTError(f"wanet artifact must hold one 'noise_grid' of shape (1, 2, {self.k}, {self.k})")
        self.noise_grid = state["noise_grid"].float()
        self.field = self._field()
