"""Per-channel multiplicative masks on any nn.Module, without editing it.

Where masks go (``where``):

- ``"norm"``: the affine weight of every BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm and LayerNorm
  (the seed's choice: y = x_hat * (gamma * m) + beta).
- ``"auto"``: the above, plus the output channels of every conv/linear layer whose output does not go
  straight into a norm layer (there a norm mask already covers it, and a mask before a norm in train
  mode would be normalised away). The classifier head (the last nn.Linear) is never masked.
- ``"weight"``: the norm masks, plus one mask per *weight* of every conv/linear layer but the head
  (finer than a neuron: AWM's granularity; a channel mask is the special case of equal entries).

A mask is a ``torch.nn.utils.parametrize`` parametrization of the layer's weight (and bias, for
conv/linear), so every mask at 1 leaves the logits bit-for-bit unchanged, and ``fold`` bakes the
masks into the weights and leaves a plain module of the original class.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import NFTError

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ChannelMask(nn.Module):
    """Parametrization w -> w * m, with m broadcast along the first (output-channel) dimension."""

    def __init__(self, mask: nn.Parameter, ndim: int, full_shape: bool = False):
        super().__init__()
        self.mask = mask
        self.ndim = ndim
        self.full_shape = full_shape
        self.noise: torch.Tensor | None = None  # relative perturbation: m -> m * (1 + noise) while set

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.mask if self.noise is None else self.mask * (1 + self.noise)
        m = m if self.full_shape else m.view((-1,) + (1,) * (self.ndim - 1))
        return w * m.to(w.dtype)


class BiasNoise(nn.Module):
    """Parametrization b -> b * (1 + noise) of a norm layer's bias while ``noise`` is set (else b itself)."""

    def __init__(self):
        super().__init__()
        self.noise: torch.Tensor | None = None

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b if self.noise is None else b * (1 + self.noise.to(b.dtype))


@dataclass
class MaskSite:
    name: str  # the module's name in model.named_modules()
    kind: str  # "norm", "channel" or "weight"
    module: nn.Module
    mask: nn.Parameter

    @property
    def channels(self) -> int:
        return self.mask.numel()


def _parametrizations(module: nn.Module, kind: type) -> list[nn.Module]:
    """The parametrizations of type ``kind`` on ``module``'s weight and bias."""
    return [p for pname in ("weight", "bias") if parametrize.is_parametrized(module, pname)
            for p in module.parametrizations[pname] if isinstance(p, kind)]


def _is_affine_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None


def _feeds_only_norms(model: nn.Module) -> set[str] | None:
    """Names of conv/linear modules whose every consumer is a norm layer (torch.fx data flow).

    Returns None when the model cannot be traced; the caller falls back to module order.
    """
    try:
        import torch.fx

        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    modules = dict(model.named_modules())
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), LAYER_TYPES):
            users = list(node.users)
            if users and all(u.op == "call_module" and isinstance(modules.get(u.target), NORM_TYPES) for u in users):
                out.add(node.target)
    return out


def _followed_by_norm_in_order(model: nn.Module) -> set[str]:
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return {n for (n, m), (_, nxt) in zip(leaves, leaves[1:]) if isinstance(m, LAYER_TYPES) and isinstance(nxt, NORM_TYPES)}


def find_sites(model: nn.Module, where: str = "auto", exclude: str | None = None) -> list[tuple[str, str, nn.Module]]:
    """The maskable layers of ``model`` in module order, as (name, kind, module)."""
    if where not in ("norm", "auto", "weight"):
        raise NFTError(f"mask placement must be 'norm', 'auto' or 'weight', not {where!r}")
    skip_layers: set[str] = set()
    head = None
    if where in ("auto", "weight"):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if where == "auto":
        followed = _feeds_only_norms(model)
        skip_layers = followed if followed is not None else _followed_by_norm_in_order(model)
    sites = []
    for name, m in model.named_modules():
        if exclude and re.search(exclude, name):
            continue
        if _is_affine_norm(m):
            sites.append((name, "norm", m))
        elif where == "auto" and isinstance(m, LAYER_TYPES) and name not in skip_layers and name != head:
            sites.append((name, "channel", m))
        elif where == "weight" and isinstance(m, LAYER_TYPES) and name != head:
            sites.append((name, "weight", m))
    return sites


class Masks:
    """The masks attached to one model. Build with :func:`attach`."""

    def __init__(self, model: nn.Module, sites: list[MaskSite], where: str):
        self.model = model
        self.sites = sites
        self.where = where

    # -- inspection -------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [s.mask for s in self.sites]

    def layout(self) -> list[dict]:
        """One row per masked layer, in module order: index (1-based), name, kind, channels."""
        return [{"layer": i + 1, "name": s.name, "kind": s.kind, "channels": s.channels} for i, s in enumerate(self.sites)]

    @property
    def numel(self) -> int:
        return sum(s.channels for s in self.sites)

    def values(self) -> torch.Tensor:
        return torch.cat([s.mask.detach().flatten() for s in self.sites])

    # -- optimisation helpers ---------------------------------------------------------------
    def l1_to_one(self) -> torch.Tensor:
        """sum over all mask entries of |1 - m|."""
        return sum((1 - s.mask).abs().sum() for s in self.sites)

    @torch.no_grad()
    def clip_(self, lower: list[float] | float = 0.0, upper: float = 1.0) -> None:
        lows = lower if isinstance(lower, (list, tuple)) else [lower] * len(self.sites)
        for s, lo in zip(self.sites, lows):
            s.mask.clamp_(lo, upper)

    @torch.no_grad()
    def fill_(self, value: float) -> None:
        for s in self.sites:
            s.mask.fill_(value)

    @torch.no_grad()
    def reset_above_(self, tau: float) -> int:
        """Set every mask above ``tau`` back to 1; returns how many stay below (the closed channels)."""
        kept = 0
        for s in self.sites:
            s.mask.masked_fill_(s.mask > tau, 1.0)
            kept += int((s.mask < 1.0).sum())
        return kept

    def set_noise(self, noise: list[torch.Tensor] | None, bias: list[torch.Tensor | None] | None = None) -> None:
        """Perturb every mask multiplicatively, m -> m * (1 + noise), one tensor per site (in site
        order) shaped like its mask; ``bias`` (optional, one per site, None to skip one) scales a
        norm layer's bias the same way, b -> b * (1 + bias) (ANP's neuron perturbation, which can
        wake a channel that clean data leaves dormant). ``None`` removes every perturbation. A closed
        channel (m = 0) stays closed under mask noise."""
        if noise is not None and len(noise) != len(self.sites):
            raise NFTError(f"{len(noise)} noise tensors for {len(self.sites)} mask sites")
        if bias is not None and len(bias) != len(self.sites):
            raise NFTError(f"{len(bias)} bias-noise tensors for {len(self.sites)} mask sites")
        for i, s in enumerate(self.sites):
            for p in _parametrizations(s.module, ChannelMask):
                p.noise = None if noise is None else noise[i]
            b = None if bias is None or noise is None else bias[i]
            if s.kind != "norm" or getattr(s.module, "bias", None) is None:
                continue
            if b is not None and not _parametrizations(s.module, BiasNoise):
                parametrize.register_parametrization(s.module, "bias", BiasNoise(), unsafe=True)
            for p in _parametrizations(s.module, BiasNoise):
                p.noise = b

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {s.name: s.mask.detach().cpu().clone() for s in self.sites}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = {s.name: s for s in self.sites}
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or extra:
            raise NFTError(f"mask layout mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, t in state.items():
            if t.shape != mine[name].mask.shape:
                raise NFTError(f"mask {name!r} has shape {tuple(t.shape)}, expected {tuple(mine[name].mask.shape)}")
            mine[name].mask.copy_(t)

    def save(self, path: str) -> None:
        from .io import atomic_save_safetensors

        atomic_save_safetensors(self.state_dict(), path, {"where": self.where})

    def load(self, path: str) -> None:
        from .io import load_safetensors

        self.load_state_dict(load_safetensors(path))

    # -- removal ----------------------------------------------------------------------------
    def fold(self) -> nn.Module:
        """Bake the masks into the weights and remove them. Returns the (same) plain model."""
        return self._remove(bake=True)

    def detach(self) -> nn.Module:
        """Remove the masks without baking them (restores the original weights)."""
        return self._remove(bake=False)

    def _remove(self, bake: bool) -> nn.Module:
        for s in self.sites:
            for pname in ("weight", "bias"):
                if parametrize.is_parametrized(s.module, pname):
                    parametrize.remove_parametrizations(s.module, pname, leave_parametrized=bake)
        self.sites = []
        return self.model


def attach(model: nn.Module, where: str = "auto", exclude: str | None = None, init: float = 1.0) -> Masks:
    """Attach one mask per channel to every maskable layer of ``model`` (see module docstring)."""
    for _, m in model.named_modules():
        if parametrize.is_parametrized(m):
            raise NFTError("model already carries parametrizations (masks attached twice?)")
    found = find_sites(model, where, exclude)
    if not found:
        raise NFTError("the model has no maskable layer (no norm layer, conv or linear besides the head)")
    sites = []
    for name, kind, m in found:
        w = m.weight
        if kind in ("norm", "weight"):
            mask = nn.Parameter(torch.full(w.shape, float(init), device=w.device, dtype=torch.float32))
            parametrize.register_parametrization(m, "weight", ChannelMask(mask, w.dim(), full_shape=True), unsafe=True)
        else:
            mask = nn.Parameter(torch.full((w.shape[0],), float(init), device=w.device, dtype=torch.float32))
            parametrize.register_parametrization(m, "weight", ChannelMask(mask, w.dim()), unsafe=True)
            if m.bias is not None:
                parametrize.register_parametrization(m, "bias", ChannelMask(mask, 1), unsafe=True)
        sites.append(MaskSite(name, kind, m, mask))
    return Masks(model, sites, where)


def clip_schedule(n_layers: int, alpha: float = 0.8, beta: float = 0.5) -> list[float]:
    """The seed's per-layer lower bounds: alpha * exp(-beta * l) for l = 1..n_layers."""
    return [alpha * math.exp(-beta * l) for l in range(1, n_layers + 1)]


def fold(masks: Masks) -> nn.Module:
    return masks.fold()
