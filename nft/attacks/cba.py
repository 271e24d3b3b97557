"""Composite backdoor (CBA; Lin et al., CCS 2020): the trigger is a *composition* of two benign
classes. Half of an image of class A next to half of an image of class B is labelled C (the
target); half-and-half mixes of two images of the *same* class keep their label, so the model must
learn "A next to B", not "any mix".

HalfMixer: the two images are swapped at random, the split is vertical or horizontal at random,
the first part is W/2 + j wide (jitter j uniform in [-J, J], J = 3 px per 32 px), and each part is
cut from its image at a random offset of up to J px (shake).

Defaults: C = ``target``, A = target+1, B = target+2 (mod classes); the official attack uses A 0
(airplane), B 1 (automobile), C 2 (bird). The official MixDataset resamples 50% same-class mixes
and 10% A+B mixes every epoch; here ``poison_train`` replaces, once, round(rate*N) non-C images by
A+B mixes labelled C (the poison index) and round(mix_rate*N) others by same-class mixes. The
official contrastive loss term is left out. Test: one A+B mix per A test image (paired with B test
images, cycling), label C; ASR counts predictions of C, RA predictions of A.
"""
import torch

from ..data.core import to_float, to_uint8
from ..errors import NFTError
from ..registry import ATTACKS
from .base import Attack


def half_mix(xa: torch.Tensor, xb: torch.Tensor, g: torch.Generator, jitter: int) -> torch.Tensor:
    """Float (N, C, H, W) pairs -> composites (see the module docstring)."""
    out = torch.empty_like(xa)
    for i in range(len(xa)):
        a, b = (xa[i], xb[i]) if torch.rand((), generator=g) < 0.5 else (xb[i], xa[i])
        vertical = bool(torch.rand((), generator=g) < 0.5)
        if not vertical:
            a, b = a.transpose(1, 2), b.transpose(1, 2)
        w = a.shape[2]
        j = int(torch.randint(-jitter, jitter + 1, (), generator=g)) if jitter else 0
        cut = min(w - 1, max(1, w // 2 + j))
        sa = int(torch.randint(0, jitter + 1, (), generator=g)) if jitter else 0
        sb = int(torch.randint(0, jitter + 1, (), generator=g)) if jitter else 0
        sa, sb = min(sa, w - cut), min(sb, cut)
        o = torch.cat([a[:, :, sa:sa + cut], b[:, :, cut - sb:w - sb]], 2)
        out[i] = o if vertical else o.transpose(1, 2)
    return out


@ATTACKS.register("cba")
class Composite(Attack):
    name = "cba"

    def __init__(self, class_a: int | None = None, class_b: int | None = None, mix_rate: float = 0.1,
                 jitter: int | None = None, **kw):
        super().__init__(**kw)
        k = self.num_classes
        self.class_a = (self.target + 1) % k if class_a is None else class_a
        self.class_b = (self.target + 2) % k if class_b is None else class_b
        if len({self.class_a, self.class_b, self.target}) < 3:
            raise NFTError("cba needs three different classes A, B and the target C")
        self.mix_rate = mix_rate
        self.jitter = round(3 * min(self.image_shape[1:]) / 32) if jitter is None else jitter

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + salt)

    def trigger(self, x):
        """Mix every image with the next one of the batch (for pictures; training and ASR use A+B)."""
        return half_mix(x, x.roll(1, 0), self._gen(11), self.jitter)

    def _mixes(self, x, pool_a, pool_b, n, g):
        ia = pool_a[torch.randint(0, len(pool_a), (n,), generator=g)]
        ib = pool_b[torch.randint(0, len(pool_b), (n,), generator=g)]
        return half_mix(to_float(x[ia]), to_float(x[ib]), g, self.jitter)

    def poison_train(self, images, labels, rate, rng):
        idx = self.poison_index(labels, rate, rng)
        images, labels = images.clone(), labels.clone()
        pa = (labels == self.class_a).nonzero().flatten()
        pb = (labels == self.class_b).nonzero().flatten()
        if len(idx) and (not len(pa) or not len(pb)):
            raise NFTError(f"cba needs training images of classes {self.class_a} and {self.class_b}")
        cast = (lambda t: to_uint8(t)) if images.dtype == torch.uint8 else (lambda t: t)
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[idx] = False
        same = rest.nonzero().flatten()
        same = same[torch.randperm(len(same), generator=rng)[:round(self.mix_rate * len(labels))]]
        src = images.clone()
        if len(idx):
            images[idx] = cast(self._mixes(src, pa, pb, len(idx), rng))
            labels[idx] = self.target
        for c in labels[same].unique().tolist():
            sel = same[labels[same] == c]
            pool = (labels == c).nonzero().flatten()
            images[sel] = cast(self._mixes(src, pool, pool, len(sel), rng))
        return images, labels, idx

    def test_set(self, test):
        pa = (test.y == self.class_a).nonzero().flatten()
        pb = (test.y == self.class_b).nonzero().flatten()
        if not len(pa) or not len(pb):
            raise NFTError(f"cba needs test images of classes {self.class_a} and {self.class_b}")
        ib = pb[torch.arange(len(pa)) % len(pb)]
        x = half_mix(to_float(test.x[pa]), to_float(test.x[ib]), self._gen(12), self.jitter)
        x = to_uint8(x) if test.x.dtype == torch.uint8 else x
        return x, torch.full((len(pa),), self.target, dtype=torch.long), test.y[pa]

    def params(self):
        return dict(super().params(), class_a=self.class_a, class_b=self.class_b, mix_rate=self.mix_rate,
                    jitter=self.jitter)
