"""Small models for tests and quick runs: a CNN with no norm layer, a CNN with BN, a tiny ViT with LayerNorm."""
import torch
import torch.nn as nn

from ..registry import MODELS


class SmallCNN(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, width=16, norm=True):
        super().__init__()
        Norm = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), Norm(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), Norm(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2), Norm(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


@MODELS.register("smallcnn")
def smallcnn(num_classes=10, in_channels=1, width=16):
    return SmallCNN(num_classes, in_channels, width, norm=True)


@MODELS.register("plaincnn")
def plaincnn(num_classes=10, in_channels=1, width=16):
    """A CNN with no norm layer at all: masks go on conv/linear output channels."""
    return SmallCNN(num_classes, in_channels, width, norm=False)


class TinyViT(nn.Module):
    """Patch embedding + pre-norm transformer encoder blocks with LayerNorm + a linear head."""

    def __init__(self, num_classes=10, in_channels=1, width=32, patch=7, image_size=28, depth=2, heads=4):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.pos = nn.Parameter(torch.zeros(1, n, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def features(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.encoder(t)).mean(1)

    def forward(self, x):
        return self.head(self.features(x))


@MODELS.register("tinyvit")
def tinyvit(num_classes=10, in_channels=1, width=32, image_size=28):
    return TinyViT(num_classes, in_channels, width, image_size=image_size)
