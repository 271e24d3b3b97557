"""VGG-16/19 with BatchNorm for small images (one linear head after global pooling)."""
import torch.nn as nn

from ..registry import MODELS

CFG = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth=16, num_classes=10, in_channels=3, width=64):
        super().__init__()
        layers, c = [], in_channels
        for v in CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                v = v * width // 64
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features_ = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def features(self, x):
        return self.pool(self.features_(x)).flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("vgg16")
def vgg16(num_classes=10, in_channels=3, width=64):
    return VGG(16, num_classes, in_channels, width)


@MODELS.register("vgg19")
def vgg19(num_classes=10, in_channels=3, width=64):
    return VGG(19, num_classes, in_channels, width)
