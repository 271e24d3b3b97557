"""Model registry. Every model takes pixels in [0, 1]; normalization is its first layer.

``build_model(arch, num_classes, in_channels, mean, std, **kwargs)`` returns a ``Classifier``:
``normalize`` (buffers only) followed by ``net`` (the registered architecture, with its own parameter
names, so foreign checkpoints load into ``model.net``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..registry import MODELS
from . import preact, resnet_cifar, small, vgg  # noqa: F401  (registration)
from .tv import torchvision_model


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalize -> net. ``features(x)`` gives the penultimate features when ``net`` has them."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x):
        return self.net(self.normalize(x))

    def features(self, x):
        x = self.normalize(x)
        if hasattr(self.net, "features") and callable(self.net.features):
            return self.net.features(x)
        head = last_linear(self.net)
        feats = []
        h = head.register_forward_hook(lambda m, i, o: feats.append(i[0]))
        try:
            self.net(x)
        finally:
            h.remove()
        return feats[0]


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier head: the last nn.Linear in module order."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear head")
    return linears[-1]


def build_net(arch: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    if arch.startswith("torchvision:"):
        return torchvision_model(arch.split(":", 1)[1], num_classes, in_channels, **kwargs)
    return MODELS.get(arch)(num_classes=num_classes, in_channels=in_channels, **kwargs)


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3, mean=None, std=None, **kwargs) -> Classifier:
    mean = mean if mean is not None else (0.0,) * in_channels
    std = std if std is not None else (1.0,) * in_channels
    return Classifier(build_net(arch, num_classes, in_channels, **kwargs), mean, std)


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["Classifier", "Normalize", "build_model", "build_net", "last_linear", "list_models"]
