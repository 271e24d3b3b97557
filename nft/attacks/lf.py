"""Low-Frequency attack (LF; Zeng et al., ICCV 2021): a universal adversarial perturbation of a
clean model, kept smooth by a Gaussian low-pass filter, added to poisoned images and clipped.

``fit`` trains a clean surrogate (small CNN, shared engine), then builds the pattern by ``steps``
signed-gradient steps that push non-target training images toward the target class, blurring
(Gaussian, sigma ``sigma`` px per 32 px) and projecting to L_inf ``eps`` after every step.
BackdoorBench builds it with DeepFool-based UAP; its CIFAR-10 pattern peaks at 51/255, hence
``eps`` 0.2. Artifact: the pattern. all2one.
"""
import torch
import torch.nn.functional as F

from ..registry import ATTACKS
from .base import Attack, PatternArtifact
from .common import check_fitted, train_surrogate


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect" if min(x.shape[-2:]) > r else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


@ATTACKS.register("lf")
class LowFrequency(PatternArtifact, Attack):
    name = "lf"

    def __init__(self, eps: float = 0.2, sigma: float = 2.0, steps: int = 200, step_size: float = 0.01,
                 surrogate_epochs: float = 2, **kw):
        super().__init__(**kw)
        self.eps, self.sigma, self.steps, self.step_size = eps, sigma, steps, step_size
        self.surrogate_epochs = surrogate_epochs
        self.pattern = torch.zeros(self.image_shape)
        self.fitted = False

    def trigger(self, x):
        check_fitted(self, "pattern")
        return x + self.pattern.to(x.device)

    def fit(self, data, runtime, batch_size: int = 128):
        model = train_surrogate(data, runtime, epochs=self.surrogate_epochs)
        dev = runtime.torch_device
        pool = self.eligible(data.train.y).nonzero().flatten()
        g = runtime.generator(808)
        sigma = self.sigma * min(self.image_shape[1:]) / 32
        delta = torch.zeros(1, *self.image_shape, device=dev)
        for _ in range(self.steps):
            idx = pool[torch.randint(0, len(pool), (batch_size,), generator=g)]
            xb = data.train.x[idx].to(dev).float() / 255
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), torch.full((len(xb),), self.target, device=dev))
            (grad,) = torch.autograd.grad(loss, delta)
            delta = gaussian_blur(delta.detach() - self.step_size * grad.sign(), sigma).clamp(-self.eps, self.eps)
        self.pattern = delta[0].cpu()
        self.fitted = True
        return self

    def params(self):
        return dict(super().params(), eps=self.eps, sigma=self.sigma, steps=self.steps, step_size=self.step_size,
                    surrogate_epochs=self.surrogate_epochs)
