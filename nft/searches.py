"""The trigger searches NFT runs beside its mask training, none of which knows the trigger.

In input space, a perturbation of the clean images pushed up the loss: one universal delta
(``UniversalPerturbation``) or one per image (``ImagePerturbation``). In neuron space, a relative
perturbation of every mask and norm bias pushed up the loss (``NeuronPerturbation``, ANP's). A
backdoor is the cheapest way to change a backdoored model's predictions, so each drifts toward it.
In the space of compositions of two clean images, ``composite_probe`` looks for a pair of classes
whose half-and-half composites the model reads as a third (a composite backdoor, which no pixel
perturbation of one image describes).
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn as nn

from .augment import half_mix, half_mix_jitter
from .masks import Masks


def _image_norms(t: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Each image's (or delta's) L2 norm, at least ``floor``, shaped to broadcast over it."""
    return t.flatten(1).norm(dim=1).clamp_min(floor).view(-1, *[1] * (t.dim() - 1))


class UniversalPerturbation:
    """One perturbation delta shared by all images, pushed up the clean loss by one normalised
    gradient step per call and kept in an L2 ball. It knows nothing of any trigger; a backdoor is
    the cheapest universal way to change predictions, so delta drifts toward it and makes clean
    images excite the neurons the trigger excites (the ones clean data leaves dormant).

    ``starts`` > 1 keeps that many deltas from independent random starts, image i of a batch
    carrying delta i mod starts: one ascent can settle on an adversarial direction that is not the
    trigger, several rarely all do; each still takes its step from its own images' gradient."""

    def __init__(self, shape, eps_rms: float, step: float, device, g: torch.Generator, starts: int = 1):
        self._scale(math.prod(shape), eps_rms, step)
        d = torch.randn((starts, *shape), generator=g, device=g.device).to(device)
        self.delta = self._project(d, 0.5 * self.radius, exact=True)

    def _scale(self, n: int, eps: float, step: float) -> None:
        """The ball's radius and the ascent step for images of ``n`` values."""
        self.radius = eps * math.sqrt(n)
        self.step = step * self.radius

    _norms = staticmethod(lambda t: _image_norms(t))

    def _project(self, d: torch.Tensor, radius: float, exact: bool = False) -> torch.Tensor:
        """Each delta scaled to ``radius`` (exact) or into the ball of that radius."""
        if len(d) == 1:  # the single-start arithmetic of earlier versions, bit for bit
            return d * (radius / d.norm()) if exact else d * min(1.0, radius / float(d.norm() + 1e-12))
        scale = radius / self._norms(d)
        return d * (scale if exact else (radius / (self._norms(d) + 1e-12)).clamp(max=1.0))

    def _per_image(self, d: torch.Tensor, n: int) -> torch.Tensor:
        return d[0] if len(d) == 1 else d[torch.arange(n, device=d.device) % len(d)]

    def _ascent(self, d: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        norm = grad.norm() if len(d) == 1 else self._norms(grad)
        return self._project(d + self.step * grad / (norm + 1e-12), self.radius)

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, toward: bool = False) -> torch.Tensor:
        """One step up the cross-entropy of ``y`` (``toward``: down it, a search that sends the images to ``y``)."""
        d = self.delta.clone().requires_grad_(True)
        was = model.training
        model.eval()  # no BN statistics from the search batches
        out = model((x + self._per_image(d, len(x))).clamp(0, 1))
        loss = nn.functional.cross_entropy(out, y) * (-1 if toward else 1)
        (grad,) = torch.autograd.grad(loss, d)
        model.train(was)
        self._vote(out.detach(), y)
        self.delta = self._ascent(d.detach(), grad)
        return self.apply(x)

    def _vote(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Count, per class, the perturbed images sent there from another class: ``target`` is the class
        the search sends most images to (the backdoor's target once it has found the trigger)."""
        pred = out.argmax(1)
        votes = torch.bincount(pred[pred != y], minlength=out.shape[1])
        self.votes = votes if getattr(self, "votes", None) is None else self.votes + votes

    @property
    def target(self) -> int | None:
        votes = getattr(self, "votes", None)
        return None if votes is None or int(votes.sum()) == 0 else int(votes.argmax())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self._per_image(self.delta, len(x))).clamp(0, 1)

    def attach(self, x: torch.Tensor) -> torch.Tensor:
        """``apply`` with delta as a leaf of the training graph; ``ascend`` then uses its gradient."""
        self._leaf = self.delta.clone().requires_grad_(True)
        return (x + self._per_image(self._leaf, len(x))).clamp(0, 1)

    def ascend(self) -> None:
        """One normalised ascent step along the gradient the training backward left on the leaf."""
        leaf, self._leaf = getattr(self, "_leaf", None), None
        if leaf is None or leaf.grad is None:
            return
        self.delta = self._ascent(self.delta, leaf.grad)


class SparsePerturbation(UniversalPerturbation):
    """``UniversalPerturbation`` in an L1 ball instead of an L2 one: radius ``eps * C*H*W`` (the
    constructor's ``eps_rms`` is here the mean |delta| per pixel), so a delta can saturate a small patch
    (a 7x7 one at 0.0625 on 28x28) that an L2 ball of the same pixel cost cannot reach. Each ascent
    step moves the ``ceil(radius)`` coordinates of largest gradient by ``step`` (a fraction of one
    pixel's range) along the gradient's sign, then projects onto the ball (Duchi et al. 2008), which
    keeps the delta sparse."""

    def _scale(self, n: int, eps: float, step: float) -> None:
        self.radius = eps * n
        self.step, self.k = step, max(1, min(n, math.ceil(self.radius)))

    def _project(self, d: torch.Tensor, radius: float, exact: bool = False) -> torch.Tensor:
        """Each delta scaled to L1 norm ``radius`` (exact) or projected onto the L1 ball of it."""
        flat = d.flatten(1)
        l1 = flat.abs().sum(1, keepdim=True)
        if exact:
            return (flat * (radius / (l1 + 1e-12))).view_as(d)
        u = flat.abs().sort(1, descending=True).values
        css = u.cumsum(1) - radius
        j = torch.arange(1, u.shape[1] + 1, device=d.device, dtype=u.dtype)
        rho = (u - css / j > 0).sum(1, keepdim=True).clamp_min(1)
        theta = (css.gather(1, rho - 1) / rho).clamp_min(0)
        out = flat.sign() * (flat.abs() - theta).clamp_min(0)
        return torch.where(l1 > radius, out, flat).view_as(d)

    def _ascent(self, d: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        g = grad.reshape(len(d), -1)
        top = g.abs().topk(self.k, dim=1).indices
        move = torch.zeros_like(g).scatter_(1, top, self.step * g.gather(1, top).sign())
        return self._project(d + move.view_as(d), self.radius)


class PatchPerturbation:
    """Universal patches: one pattern per window of a ``grid`` x ``grid`` lattice of square windows of side
    ``side`` (a fraction of the image side; the lattice runs from corner to corner, so ``grid`` 2 is the four
    corners), pasted over the image inside its window (any value in [0, 1]; the image is kept outside), pushed
    up the clean loss by one signed-gradient step of ``step`` per call. Image i of a batch carries window i mod
    the number of windows; ``corners`` adds one more window (index ``grid``^2, when ``grid`` >= 2): the four corner
    windows at once, a single pattern across them (CLB's trigger is a checkerboard in every corner, so that it
    survives a flip; no single window fires it); ``only`` keeps window ``only`` alone. A patch trigger (BadNets,
    TrojanNN's optimised square, CLB's corner checkerboards) is small in area but large in norm: an L2 ball that
    reaches it reaches everything else too, a window does not. Pasting, not adding: an added delta clipped to
    [0, 1] gets no gradient where it pushes a black background below 0, and would stay there."""

    def __init__(self, shape, side: float, grid: int, step: float, device, g: torch.Generator,
                 only: int | None = None, corners: bool = False):
        c, h, w = shape
        k = max(1, round(side * min(h, w)))
        rows = [round(i * (h - k) / (grid - 1)) for i in range(grid)] if grid > 1 else [(h - k) // 2]
        cols = [round(i * (w - k) / (grid - 1)) for i in range(grid)] if grid > 1 else [(w - k) // 2]
        win = torch.zeros(len(rows) * len(cols), 1, h, w)
        for n, (r, q) in enumerate((r, q) for r in rows for q in cols):
            win[n, :, r:r + k, q:q + k] = 1.0
        if corners and grid > 1:
            win = torch.cat([win, win[[0, grid - 1, grid * (grid - 1), grid * grid - 1]].amax(0, keepdim=True)])
        if only is not None:  # one window of the lattice (the one patch_probe flagged)
            win = win[only:only + 1]
        self.window, self.side, self.step = win.to(device), k, step
        self.pattern = torch.rand((len(win), c, h, w), generator=g, device=g.device).to(device) * self.window

    def _paste(self, x: torch.Tensor, p: torch.Tensor, which: int | None = None) -> torch.Tensor:
        i = torch.arange(len(x), device=x.device) % len(p) if which is None else torch.full((len(x),), which, device=x.device)
        m = self.window[i]
        return x * (1 - m) + p[i] * m

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.pattern.clone().requires_grad_(True)
        was = model.training
        model.eval()  # no BN statistics from the search batches
        loss = nn.functional.cross_entropy(model(self._paste(x, p)), y)
        (grad,) = torch.autograd.grad(loss, p)
        model.train(was)
        self.pattern = (p.detach() + self.step * grad.sign()).clamp(0, 1) * self.window
        return self.apply(x)

    def apply(self, x: torch.Tensor, which: int | None = None) -> torch.Tensor:
        """``x`` with its patches (every image with window ``which``, if given)."""
        return self._paste(x, self.pattern, which)

    def ascend(self) -> None:  # update() already took its step
        return None


class ImagePerturbation:
    """A fresh perturbation per image and batch: ``steps`` of L2 PGD from a random start in the ball
    of radius ``eps_rms * sqrt(C*H*W)``, up the clean loss of the current masked model. Unlike the
    universal delta it can follow a trigger that differs from image to image (ISSBA, input-aware)."""

    def __init__(self, shape, eps_rms: float, steps: int, g: torch.Generator):
        self.radius = eps_rms * math.sqrt(math.prod(shape))
        self.steps, self.g = steps, g

    _norms = staticmethod(lambda t: _image_norms(t, 1e-12))

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.randn(x.shape, generator=self.g, device=self.g.device).to(x.device)
        d = d * (0.5 * self.radius / self._norms(d))  # start halfway to the ball's surface
        was = model.training
        model.eval()  # no BN statistics from the search batches
        for _ in range(self.steps):
            d.requires_grad_(True)
            loss = nn.functional.cross_entropy(model((x + d).clamp(0, 1)), y)
            (grad,) = torch.autograd.grad(loss, d)
            d = d.detach() + (2.5 * self.radius / self.steps) * grad / self._norms(grad)
            d = d * (self.radius / self._norms(d)).clamp(max=1.0)
        model.train(was)
        return (x + d).clamp(0, 1)

    def ascend(self) -> None:  # nothing carries over between batches
        return None


class NeuronPerturbation:
    """Adversarial neuron perturbation (ANP, Wu & Wang 2021) on NFT's masks: every mask m becomes
    m (1 + d) and (``bias``) every norm layer's bias b becomes b (1 + e), with d, e in [-eps, eps],
    from a uniform random start pushed ``steps`` signed-gradient steps up the loss. A backdoored
    network is fragile there: small relative changes of a few channels wake the backdoor and send
    clean images to the target, whatever shape its trigger has in input space. Training the masks on
    the perturbed network's loss closes those channels (a closed channel's output is its bias alone,
    so the masks cannot undo a bias perturbation; they can only make the rest of the network robust
    to it, as in ANP)."""

    def __init__(self, masks: Masks, eps: float, steps: int, g: torch.Generator, bias: bool = True):
        self.masks, self.eps, self.steps, self.g = masks, eps, steps, g
        self.has_bias = [bias and s.kind == "norm" and getattr(s.module, "bias", None) is not None
                         for s in masks.sites]

    def _uniform(self, shape, device) -> torch.Tensor:
        return (torch.rand(shape, generator=self.g, device=self.g.device).to(device) * 2 - 1) * self.eps

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = [self._uniform(s.mask.shape, x.device) for s in self.masks.sites]  # on the masks
        e = [self._uniform(s.mask.shape, x.device) if b else None for s, b in zip(self.masks.sites, self.has_bias)]
        try:
            for _ in range(self.steps):
                live = [t.requires_grad_(True) for t in d + e if t is not None]
                self.masks.set_noise(d, e)
                grads = iter(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), live))

                def up(t):
                    return None if t is None else (t.detach() + (self.eps / self.steps) * next(grads).sign()).clamp(
                        -self.eps, self.eps)

                d, e = [up(t) for t in d], [up(t) for t in e]
            self.masks.set_noise(d, e)
            return nn.functional.cross_entropy(model(x), y)
        finally:
            self.masks.set_noise(None)


def universal_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_rms: float, step: float, steps: int,
                    batch_size: int, g: torch.Generator) -> dict:
    """How far one universal delta, searched for ``steps`` normalised-gradient steps up the loss of the
    frozen ``model`` on the clean images ``(x, y)`` (batches drawn with ``g``), sends them to one class.

    Returns ``flip``: the largest, over classes c, fraction of the images not of class c that the
    delta sends to c, and ``to``: that class. On a backdoored model the delta finds the backdoor
    and sends the images to its target. It is a diagnostic, not a stopping rule: on mnist10k models
    purified by NFT it did not tell an open backdoor from a closed one (a relapsed run 31 % to a
    non-target class, a clean run 25 %; benchmarks/NOTES.md §14)."""
    device = next(model.parameters()).device
    search = UniversalPerturbation(tuple(x.shape[1:]), eps_rms, step, device, g)
    was = model.training
    model.eval()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g, device=g.device).cpu()
        search.update(model, x[idx].to(device), y[idx].to(device))
    with torch.no_grad():
        pred = torch.cat([model(search.apply(x[i:i + 256].to(device))).argmax(1).cpu()
                          for i in range(0, len(x), 256)])
    model.train(was)
    classes = int(max(y.max(), pred.max())) + 1
    sent = torch.bincount(pred[pred != y], minlength=classes).float()
    others = (len(y) - torch.bincount(y, minlength=classes)).clamp_min(1).float()
    rate = sent / others
    return {"flip": float(rate.max()), "to": int(rate.argmax())}


def targeted_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, eps_rms: float, step: float,
                   steps: int, batch_size: int, g: torch.Generator) -> dict:
    """Which class is the backdoor's target? For each class c, one universal delta in an L2 ball of ``eps_rms`` a pixel,
    ``steps`` normalised steps down the cross-entropy to c of the clean images not of class c (batches drawn with the
    CPU generator ``g``); ``rates[c]`` is the share of those images it then sends to c, in %. A trigger is a shortcut
    to its target, so in a small ball the target stands out where an untargeted search goes to the class easiest to
    reach by adding ink (8 on digits; benchmarks/NOTES.md §32). Returns rates, ``to`` (the argmax) and ``margin``
    (its lead over the second)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()  # (update() leaves the model in the mode it found)
    rates = []
    for c in range(num_classes):
        xs = x[y != c]
        if len(xs) == 0:
            rates.append(0.0)
            continue
        search = UniversalPerturbation(tuple(x.shape[1:]), eps_rms, step, device, g)
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (min(batch_size, len(xs)),), generator=g)
            search.update(model, xs[idx].to(device), torch.full((len(idx),), c, device=device), toward=True)
        with torch.no_grad():
            hit = sum(int((model(search.apply(xs[i:i + 256].to(device))).argmax(1) == c).sum())
                      for i in range(0, len(xs), 256))
        rates.append(round(100.0 * hit / len(xs), 2))
    model.train(was)
    order = sorted(range(num_classes), key=lambda k: -rates[k])
    return {"rates": rates, "to": order[0], "margin": round(rates[order[0]] - rates[order[1]], 2) if num_classes > 1 else 0.0}


def patch_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, side: float, grid: int, step: float, steps: int,
                batch_size: int, g: torch.Generator, corners: bool = False) -> dict:
    """How far a universal patch (``PatchPerturbation``'s windows, each searched for ``steps`` signed steps up
    the loss of the frozen ``model`` on batches of the clean images ``(x, y)`` drawn with the CPU generator
    ``g``) sends the clean images to one class: a patch trigger is a window in which one pattern sends
    nearly every image to the target; a stroke written into a clean model's digits moves some of them.

    Returns ``windows``: per window [share, class], the largest over classes c of the share of the images
    not of class c that the window's patch sends to c; ``share``, ``to`` and ``window`` of the largest (the first
    of equal ones), and the ``median`` share of the lattice's windows. ``corners``: then the four-corner window
    (``PatchPerturbation``'s last, searched on its own with one window's share of a batch) is the last row."""
    device = next(model.parameters()).device
    shape = tuple(x.shape[1:])
    lattice = PatchPerturbation(shape, side, grid, step, device, g)
    n = len(lattice.window)

    def search_and_score(search: PatchPerturbation) -> list:
        k = len(search.window)  # a batch gives each window the same share: batch_size / n images
        for _ in range(steps):
            idx = torch.randint(0, len(x), (min(batch_size, len(x)) // n * k or k,), generator=g)
            search.update(model, x[idx].to(device), y[idx].to(device))
        with torch.no_grad():
            classes = int(model(x[:1].to(device)).shape[1])
            others = (len(y) - torch.bincount(y, minlength=classes)).clamp_min(1).float()
            rows = []
            for w in range(k):
                pred = torch.cat([model(search.apply(x[i:i + 256].to(device), w)).argmax(1).cpu()
                                  for i in range(0, len(x), 256)])
                rate = torch.bincount(pred[pred != y], minlength=classes)[:classes].float() / others
                rows.append([round(float(rate.max()), 4), int(rate.argmax())])
        return rows

    was = model.training
    model.eval()
    try:
        rows = search_and_score(lattice)
        if corners and grid > 1:  # made after the lattice's search, which so draws from g as it would alone
            rows += search_and_score(PatchPerturbation(shape, side, grid, step, device, g, only=n, corners=True))
    finally:
        model.train(was)
    top = max(range(len(rows)), key=lambda w: rows[w][0])
    return {"windows": rows, "share": rows[top][0], "to": rows[top][1], "window": top,
            "median": statistics.median(r[0] for r in rows[:n])}


@torch.no_grad()
def composite_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, k: int, share: float,
                    g: torch.Generator, index: float = 2.0, max_pairs: int = 1000, batch_size: int = 256) -> dict:
    """A search for a composite backdoor (CBA: half an image of class a next to half an image of
    class b is read as a third class c): for every pair of classes {a, b} of the clean images
    ``(x, y)``, ``k`` half-and-half composites (``augment.half_mix``, one image of a and one of b drawn
    with the CPU generator ``g``), and the largest share of them ``model`` sends to one class c other
    than a and b. The pairs at ``share`` or more whose share is also an outlier among the pairs' (anomaly
    index (share - median) / (1.4826 MAD) at least ``index``, Neural Cleanse's rule with its 2) are
    returned: a weak model that reads most composites as one class (a 3-epoch CNN read 33 of 45 pairs'
    composites as its backdoor's target, median share 0.91) has no outlier pair. (Adding the pairs that go to the same c
    at half that share diluted the composites of CBA's own pair and left it at 37.5 % ASR against 2.7
    with its pair alone, NOTES §16.) On mnist10k the CBA model sends 95 % of its pair's
    composites to the target, the 17 other models at most 47 % of any pair's (52 % with one image
    per class) to one class (benchmarks/NOTES.md §16).

    Returns ``pairs``: [(a, b, c, share)] (empty: nothing flagged), ``top``: the pair of largest
    share, ``probed``: how many pairs (at most ``max_pairs``, drawn with ``g`` when there are more),
    ``median`` and ``mad`` of the shares."""
    device = next(model.parameters()).device
    present = sorted(int(c) for c in torch.unique(y))
    pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
    if len(pairs) > max_pairs:
        pairs = [pairs[int(i)] for i in torch.randperm(len(pairs), generator=g)[:max_pairs]]
    jitter = half_mix_jitter(x.shape)
    was = model.training
    model.eval()
    rows = []
    try:
        for a, b in pairs:
            ia, ib = (y == a).nonzero().flatten(), (y == b).nonzero().flatten()
            xa = x[ia[torch.randint(0, len(ia), (k,), generator=g)]]
            xb = x[ib[torch.randint(0, len(ib), (k,), generator=g)]]
            comp = half_mix(xa, xb, g, jitter)
            pred = torch.cat([model(comp[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, k, batch_size)])
            rate = torch.bincount(pred, minlength=num_classes).float() / k
            rate[[a, b]] = -1.0
            rows.append((a, b, int(rate.argmax()), float(rate.max())))
    finally:
        model.train(was)
    shares = sorted(r[3] for r in rows)
    med = statistics.median(shares) if shares else 0.0
    mad = statistics.median(abs(v - med) for v in shares) if shares else 0.0

    def outlier(v):
        return v > med if mad == 0 else (v - med) / (1.4826 * mad) >= index

    found = [r for r in rows if r[3] >= share and outlier(r[3])]
    return {"pairs": sorted(found, key=lambda r: -r[3]), "top": max(rows, key=lambda r: r[3]) if rows else None,
            "probed": len(rows), "median": med, "mad": mad}
