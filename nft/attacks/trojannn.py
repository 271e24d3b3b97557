"""TrojanNN (Liu et al., NDSS 2018): a trigger optimised to excite chosen neurons of a clean model.

``fit`` trains a clean surrogate (small CNN, shared engine), picks the ``neurons`` penultimate
features with the largest sum of |W| over the classes in the final linear layer, and runs
``steps`` sign-gradient steps (``step_size``, pixels in [0, 1]) on the trigger pixels inside the
mask (a bottom-right square, side 1/4 of the image, standing in for BackdoorBench's apple
watermark) to minimise sum_k (a_k - ``act_target``)^2. The trigger is added and clipped.
Artifact: the trigger pattern (zeros outside the mask). all2one (and all2all).
"""
import torch

from ..models import last_linear
from ..registry import ATTACKS
from .base import Attack, PatternArtifact
from .common import check_fitted, train_surrogate


@ATTACKS.register("trojannn")
class TrojanNN(PatternArtifact, Attack):
    name = "trojannn"
    modes = ("all2one", "all2all")

    def __init__(self, size: int | None = None, neurons: int = 2, steps: int = 300, step_size: float = 0.02,
                 act_target: float = 100.0, surrogate_epochs: float = 2, **kw):
        super().__init__(**kw)
        c, h, w = self.image_shape
        self.size = size or max(3, round(min(h, w) / 4))
        self.neurons, self.steps, self.step_size, self.act_target = neurons, steps, step_size, act_target
        self.surrogate_epochs = surrogate_epochs
        self.mask = torch.zeros(1, h, w)
        self.mask[:, h - self.size:, w - self.size:] = 1.0
        self.pattern = torch.zeros(c, h, w)
        self.fitted = False

    def trigger(self, x):
        check_fitted(self, "pattern")
        return x + self.pattern.to(x.device)

    def fit(self, data, runtime):
        model = train_surrogate(data, runtime, epochs=self.surrogate_epochs)
        dev = runtime.torch_device
        head = last_linear(model)
        chosen = head.weight.detach().abs().sum(0).topk(self.neurons).indices
        mask = self.mask.to(dev)
        p = (0.5 * mask).expand(self.image_shape).clone()[None]
        for _ in range(self.steps):
            p.requires_grad_(True)
            act = model.features(p * mask)[:, chosen]
            loss = (act - self.act_target).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, p)
            p = (p.detach() - self.step_size * grad.sign()).clamp(0, 1)
        self.pattern = (p * mask)[0].detach().cpu()
        self.chosen = chosen.tolist()
        self.fitted = True
        return self

    def params(self):
        return dict(super().params(), size=self.size, neurons=self.neurons, steps=self.steps,
                    step_size=self.step_size, act_target=self.act_target, surrogate_epochs=self.surrogate_epochs)
