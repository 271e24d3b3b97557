"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022), data-free; as in
BackdoorBench ``defense/clp.py``.

For every BatchNorm paired with the conv that precedes it in module order, the upper bound of the
channel Lipschitz constant of output channel k is

    UCLC_k = sigma_max(W_k reshaped to (in, kh * kw)) * |gamma_k / sqrt(var_k + eps)|,

and every channel with UCLC_k > mean + u * std (within its layer) gets its BN weight and bias
zeroed. On pre-activation ResNets a BN precedes its conv, so this module-order pairing is only
approximate (the spec notes it); a BN whose channel count differs from its conv's is skipped. A
model without BatchNorm is handled conv by conv (gamma / sigma = 1), zeroing the conv's output
channels. The clean set is never read.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..registry import DEFENSES
from .base import DefenseResult, config_with
from .common import prepare

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class CLPConfig:
    u: float = 3.0  # BB default (BB also sweeps u in 0..10, which needs test data; not done here)


def uclc(conv: nn.Module, scale: torch.Tensor | None) -> torch.Tensor:
    """sigma_max of each output channel's (in, k*k) weight, times |scale| when given."""
    w = conv.weight.detach().float()
    per = w.reshape(w.shape[0], w.shape[1], -1)
    sv = torch.linalg.matrix_norm(per, ord=2)  # the largest singular value of each (in, kh*kw) slice
    return sv * scale.abs() if scale is not None else sv


def pairs(model: nn.Module):
    """(conv name, conv, bn name or None, bn) in module order, as BackdoorBench pairs them."""
    bns = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    conv, out = None, []
    for name, m in model.named_modules():
        if isinstance(m, CONVS):
            if not bns:
                out.append((name, m, None, None))
            conv = (name, m)
        elif bns and isinstance(m, nn.modules.batchnorm._BatchNorm) and conv is not None:
            if m.affine and conv[1].weight.shape[0] == m.num_features:
                out.append((conv[0], conv[1], name, m))
    return out


@DEFENSES.register("clp")
@torch.no_grad()
def defend_clp(model, clean=None, cfg: CLPConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    cfg = cfg if isinstance(cfg, CLPConfig) else config_with(CLPConfig, cfg or {})
    model, runtime = prepare(model, runtime)
    t0 = time.perf_counter()
    pruned, total = {}, 0
    for cname, conv, bname, bn in pairs(model):
        scale = bn.weight / (bn.running_var + bn.eps).sqrt() if bn is not None else None
        lips = uclc(conv, scale)
        total += len(lips)
        idx = torch.where(lips > lips.mean() + cfg.u * lips.std())[0]
        if len(idx) == 0:
            continue
        target = bn if bn is not None else conv
        target.weight[idx] = 0.0
        if target.bias is not None:
            target.bias[idx] = 0.0
        pruned[bname or cname] = idx.tolist()
    extras = {"seconds": time.perf_counter() - t0, "config": asdict(cfg), "channels": total,
              "pruned": sum(len(v) for v in pruned.values()), "pruned_channels": pruned, "data_free": True}
    return DefenseResult(model.eval(), [], extras)
