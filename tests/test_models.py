import pytest
import torch

from nft.models import build_model, list_models

SMALL = {"preactresnet18": {"width": 4}, "resnet18": {"width": 4}, "vgg16": {"width": 8}, "vgg19": {"width": 8}}


@pytest.mark.parametrize("arch", list_models() + ["torchvision:resnet18"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_every_model_forward_backward(arch, channels, size):
    kwargs = dict(SMALL.get(arch, {}))
    if arch == "tinyvit":
        kwargs["image_size"] = size
        if size % 7:
            pytest.skip("tinyvit uses 7-px patches")
    model = build_model(arch, 7, channels, (0.5,) * channels, (0.25,) * channels, **kwargs)
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    feats = model.features(x)
    assert feats.dim() == 2 and feats.shape[0] == 2


def test_normalization_is_first_layer():
    model = build_model("smallcnn", 10, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model(x), model.net((x - 0.5) / 0.5))


def test_preact_names_match_backdoorbench():
    keys = set(build_model("preactresnet18", 10, 3).net.state_dict())
    for k in ("conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight", "layer2.0.shortcut.0.weight",
              "linear.weight", "linear.bias"):
        assert k in keys
    assert sum(1 for k in keys if k.endswith("running_mean")) == 16
