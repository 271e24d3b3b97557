"""The one defense verb (DESIGN.md §3):

    defend(model, clean: CleanSet, cfg, runtime, monitor=None) -> DefenseResult(model, history, extras)

A defense sees only the model and the defender's clean set. ``monitor`` is the runner's optional
evaluation callback (it closes over test data the defense never touches); defenses call it, if at
all, only to log ACC/ASR along their progress.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch.nn as nn

from ..errors import NFTError


@dataclass
class DefenseResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def config_with(cls, overrides: dict):
    """Build a config dataclass from its defaults, overriding only the keys that are not None."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in names)
    if unknown:
        raise NFTError(f"{cls.__name__} has no setting(s) {unknown}")
    return replace(cls(), **{k: v for k, v in overrides.items() if v is not None and k in names})
