"""ISSBA (Li et al., ICCV 2021): sample-specific invisible triggers from a steganography encoder.

BackdoorBench only replays images pre-encoded by a StegaStamp model; this trains a small
StegaStamp-style encoder/decoder **from scratch** in ``fit`` (on the training images):

- Encoder: the ``bits``-bit secret -> dense -> one H x W plane, concatenated with the image, then a
  small U-Net -> a residual r; encoded image x + r.
- Decoder: a stride-2 conv stack, global pooling, dense -> bits.
- Loss: BCE(bits) + w * MSE(image); w = 0 until bit accuracy first exceeds 0.9 (or until step
  ``ramp_by`` at the latest), then it ramps linearly to ``img_weight`` over ``ramp`` steps (StegaStamp's
  schedule, shortened). Random secrets during training; Adam lr 1e-3, batch 64, ``steps`` steps.

Poisoning embeds **one fixed secret** (drawn from the attack's seed) in every poisoned image; the
trigger is x' = clip(x + r(x, secret)). ``fit_stats`` records the final bit accuracy and PSNR.
Artifact: the encoder weights and the secret (the decoder is not needed to poison).

``ramp_by`` (None: no latest step, the first schedule): without it, a fit whose bits cross 0.9 late gets
almost no image loss (one mnist10k build on an AMD CPU crossed at step 786 of 800: PSNR 6.5 dB, a residual
that overwrites the digit; benchmarks/NOTES.md §29-§30).

Defaults since session 28: ``steps`` 1200 and ``ramp_by`` 400 (the image loss reaches full weight by step 600
and keeps it for 600 steps). On five mnist10k seeds they gave PSNR 21.6-28.9 dB (mean 26.0) with ASR 100, where
the first schedule (800 steps, no ``ramp_by``) gave 6.5-23.3 dB (NOTES §31). Records made before then with no
ISSBA settings used the first schedule: ``--set issba.steps=800 --set issba.ramp_by=null`` rebuilds those.
``img_weight`` 100 gives ~35 dB but the bits are not yet learned in 800 steps (bit accuracy 0.62).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NFTError
from ..registry import ATTACKS
from .base import Attack, pattern_generator
from .common import UNet, check_fitted, load_module_state, module_state


class Encoder(nn.Module):
    def __init__(self, shape, bits, widths):
        super().__init__()
        c, h, w = shape
        self.h, self.w = h, w
        self.dense = nn.Linear(bits, h * w)
        self.net = UNet(c + 1, c, widths, skips=True)

    def forward(self, x, secret):
        plane = F.relu(self.dense(secret * 2 - 1)).view(-1, 1, self.h, self.w)
        return self.net(torch.cat([x, plane.expand(len(x), -1, -1, -1)], 1))


class Decoder(nn.Module):
    def __init__(self, c, bits, width=16):
        super().__init__()
        layers, cin = [], c
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU(inplace=True)]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 128),
                                  nn.ReLU(inplace=True), nn.Linear(128, bits))

    def forward(self, x):
        return self.body(x)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(F.mse_loss(a, b))
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@ATTACKS.register("issba")
class ISSBA(Attack):
    name = "issba"
    modes = ("all2one", "all2all")
    spec_defaults = {"steps": 1200, "ramp_by": 400}  # changed after records existed (see Attack.spec_defaults)
    omitted_params = {"ramp_by": None}  # manifests before session 28 wrote ramp_by only when it was set

    def __init__(self, bits: int = 16, widths=(16, 32), steps: int = 1200, img_weight: float = 10.0,
                 ramp: int = 200, lr: float = 1e-3, ramp_by: int | None = 400, **kw):
        super().__init__(**kw)
        self.bits, self.widths, self.steps = bits, tuple(widths), steps
        self.img_weight, self.ramp, self.lr = img_weight, ramp, lr
        if ramp_by is not None and not 0 <= ramp_by < steps:
            raise NFTError(f"issba ramp_by must be None or a step in [0, steps={steps}), got {ramp_by} "
                           "(with fewer steps, set ramp_by too, e.g. a third of them)")
        self.ramp_by = ramp_by
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 7919 + 19)
            self.encoder = Encoder(self.image_shape, bits, self.widths)
        self.secret = (torch.rand(bits, generator=pattern_generator(self.seed, 19)) < 0.5).float()
        self.fitted = False
        self.fit_stats = {}

    def trigger(self, x):
        check_fitted(self, "trained encoder")
        self.encoder.to(x.device).eval()
        with torch.no_grad():
            return x + self.encoder(x, self.secret.to(x.device)[None])

    def fit(self, data, runtime, batch_size: int = 64):
        dev = runtime.torch_device
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 7919 + 23)
            decoder = Decoder(self.image_shape[0], self.bits).to(dev)
        enc = self.encoder.to(dev).train()
        opt = torch.optim.Adam(list(enc.parameters()) + list(decoder.parameters()), lr=self.lr)
        g = runtime.generator(707)
        x_all, start = data.train.x, None
        for step in range(self.steps):
            idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
            xb = x_all[idx].to(dev).float() / 255 if x_all.dtype == torch.uint8 else x_all[idx].to(dev)
            secret = (torch.rand(batch_size, self.bits, generator=g) < 0.5).float().to(dev)
            xe = (xb + enc(xb, secret)).clamp(0, 1)
            logits = decoder(xe)
            bit_acc = float(((logits > 0).float() == secret).float().mean())
            if start is None and (bit_acc > 0.9 or step == self.ramp_by):
                start = step
            w = 0.0 if start is None else self.img_weight * min(1.0, (step - start) / max(1, self.ramp))
            loss = F.binary_cross_entropy_with_logits(logits, secret) + w * F.mse_loss(xe, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        enc.eval()
        with torch.no_grad():
            xb = x_all[:256].to(dev).float() / 255 if x_all.dtype == torch.uint8 else x_all[:256].to(dev)
            xe = (xb + enc(xb, self.secret.to(dev)[None])).clamp(0, 1)
            acc = float(((decoder.eval()(xe) > 0).float() == self.secret.to(dev)).float().mean())
        self.fit_stats = {"bit_acc": acc, "psnr": psnr(xe, xb), "ramp_start": start}
        self.fitted = True
        return self

    def params(self):
        return dict(super().params(), bits=self.bits, widths=list(self.widths), steps=self.steps,
                    img_weight=self.img_weight, ramp=self.ramp, lr=self.lr, ramp_by=self.ramp_by)

    def state_dict(self):
        return {**module_state("encoder", self.encoder), "secret": self.secret.clone()}

    def load_state_dict(self, state):
        if "secret" not in state or tuple(state["secret"].shape) != (self.bits,):
            raise NFTError(f"issba artifact must hold a {self.bits}-bit 'secret'")
        self.secret = state["secret"].float()
        load_module_state("encoder", self.encoder, {k: v for k, v in state.items() if k != "secret"})
        self.fitted = True
