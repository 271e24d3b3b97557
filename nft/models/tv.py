"""Any torchvision classification model by name: ``torchvision:resnet50``."""
import torch.nn as nn

from ..errors import NFTError


def torchvision_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (ValueError, KeyError) as e:
        raise NFTError(f"unknown torchvision model {name!r}: {e}") from None
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return
    raise NFTError("could not find the first 3-channel conv to adapt to in_channels")
