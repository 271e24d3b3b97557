"""LIRA (Doan et al., ICCV 2021): a learned, nearly invisible additive trigger x' = clip(x + eps * T(x)),
with T a small autoencoder (tanh output) trained jointly with the victim.

Inside the shared engine (``train_hooks``): per batch the first rate*B samples pass through T and
get the target label; the loss is CE over the whole batch, so the engine's backward gives the
victim its clean + poisoned loss and T the gradient of CE(f(x'), t) (T's part of the graph sees
only the poisoned samples). T's own Adam steps in ``after_step``.

Deviations, for an 8-epoch CPU budget: ``eps`` is in pixel space (0.05, about 13/255; the paper's
0.01 is in normalized space, ~0.003 px), T's Adam uses lr 1e-3 (paper 1e-4), T trains for the whole
run (no separate fine-tuning stage), and samples are poisoned at the poison rate rather than every
sample seen both clean and poisoned. Artifact: T's weights.
"""
import torch

from ..engine import Hooks
from ..registry import ATTACKS
from .common import OnTheFlyAttack, UNet, check_fitted, load_module_state, module_state, sync_grads


@ATTACKS.register("lira")
class LIRA(OnTheFlyAttack):
    name = "lira"
    modes = ("all2one", "all2all")

    def __init__(self, eps: float = 0.05, widths=(16, 32), lr: float = 1e-3, **kw):
        super().__init__(**kw)
        self.eps, self.widths, self.lr = eps, tuple(widths), lr
        c = self.image_shape[0]
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 7919 + 17)
            self.T = UNet(c, c, self.widths, skips=False)
        self.fitted = False

    def fit(self, data, runtime):
        """Nothing to do before training: T trains with the victim. Marks the attack ready."""
        self.fitted = True
        return self

    def trigger(self, x):
        check_fitted(self, "trained generator")
        self.T.to(x.device).eval()
        with torch.no_grad():
            return x + self.eps * torch.tanh(self.T(x))

    def train_trigger(self, x):
        self.T.to(x.device).train()
        return x + self.eps * torch.tanh(self.T(x))

    def _hooks(self, runtime):
        self.fitted = True
        self.T.to(runtime.torch_device)
        opt = torch.optim.Adam(self.T.parameters(), lr=self.lr)

        def after_step(step, info):
            sync_grads(self.T.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)

        return Hooks(after_step=after_step)

    def params(self):
        return dict(super().params(), eps=self.eps, widths=list(self.widths), lr=self.lr)

    def state_dict(self):
        return module_state("T", self.T)

    def load_state_dict(self, state):
        load_module_state("T", self.T, state)
        self.fitted = True
