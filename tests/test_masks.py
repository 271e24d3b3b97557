import copy

import pytest
import torch
import torch.nn as nn

from nft.errors import NFTError
from nft.masks import attach, clip_schedule, find_sites
from nft.models import build_model


def _models():
    torch.manual_seed(0)
    return {
        "preactresnet18": (build_model("preactresnet18", 10, 3, width=8), (4, 3, 32, 32)),
        "torchvision:resnet18": (build_model("torchvision:resnet18", 10, 3), (2, 3, 32, 32)),
        "tinyvit": (build_model("tinyvit", 10, 1), (4, 1, 28, 28)),
        "plaincnn": (build_model("plaincnn", 10, 1), (4, 1, 28, 28)),
    }


def _randomize_norms(model):
    # non-trivial BN statistics and affine parameters, so the check is not a degenerate one
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "weight") and isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


@pytest.mark.parametrize("where", ["auto", "weight"])
@pytest.mark.parametrize("name", list(_models()))
def test_ones_exact_and_fold_matches(name, where):
    model, shape = _models()[name]
    _randomize_norms(model)
    model.eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    original_class = type(model.net)
    masks = attach(model, where)
    assert len(masks.sites) > 0
    assert torch.equal(model(x), ref), "all-ones masks must leave the logits bit-for-bit unchanged"
    # move the masks, check the output changes, then fold and compare
    with torch.no_grad():
        for s in masks.sites:
            s.mask.uniform_(0.3, 1.0)
    masked = model(x)
    assert not torch.allclose(masked, ref)
    plain = masks.fold()
    assert type(plain.net) is original_class
    assert not any("parametrizations" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x), masked, atol=1e-5, rtol=1e-5)


def test_sites_preact_norm_and_auto():
    model = build_model("preactresnet18", 10, 3, width=8)
    norm = find_sites(model, "norm")
    assert len(norm) == 16 and all(k == "norm" for _, k, _ in norm)
    auto = find_sites(model, "auto")
    names = [n for n, _, _ in auto]
    assert "net.linear" not in names  # the head is never masked
    assert "net.layer1.0.conv1" not in names  # feeds only bn2
    assert "net.layer1.0.conv2" in names  # feeds a residual add


def test_weight_masks_cover_every_weight_but_the_head():
    model = build_model("preactresnet18", 10, 3, width=8)
    masks = attach(model, "weight")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "net.linear"]
    weights = [s for s in masks.sites if s.kind == "weight"]
    assert [s.name for s in weights] == [n for n, _ in layers]
    assert all(s.mask.shape == m.weight.shape for s, (_, m) in zip(weights, layers))
    assert masks.numel == sum(m.weight.numel() for _, m in layers) + sum(
        s.mask.numel() for s in masks.sites if s.kind == "norm")
    with torch.no_grad():  # one weight closed: only that entry of the layer's effective weight is 0
        weights[0].mask[0, 0, 0, 0] = 0.0
    w = layers[0][1].weight
    assert float(w[0, 0, 0, 0]) == 0.0 and bool((w.flatten()[1:] != 0).all())


def test_plain_cnn_uses_channel_masks():
    model = build_model("plaincnn", 10, 1)
    masks = attach(model, "auto")
    assert {s.kind for s in masks.sites} == {"channel"}
    assert [s.name for s in masks.sites] == ["net.body.0", "net.body.3", "net.body.6"]
    with pytest.raises(NFTError):
        attach(build_model("plaincnn", 10, 1), "norm")  # no norm layer at all


def test_clip_schedule_values():
    lows = clip_schedule(10, 0.8, 0.5)
    expected = [0.485, 0.294, 0.179, 0.108, 0.066, 0.040, 0.024, 0.015, 0.009, 0.005]
    assert [round(v, 3) for v in lows] == expected


def test_clip_per_layer():
    model = build_model("smallcnn", 10, 1)
    masks = attach(model, "norm")
    with torch.no_grad():
        for s in masks.sites:
            s.mask.fill_(-1.0)
        masks.sites[0].mask[0] = 5.0
    lows = clip_schedule(len(masks.sites))
    masks.clip_(lows)
    for s, lo in zip(masks.sites, lows):
        assert torch.all(s.mask >= lo - 1e-7) and torch.all(s.mask <= 1.0)
    assert float(masks.sites[0].mask[0]) == 1.0 and float(masks.sites[1].mask[0]) == pytest.approx(lows[1])


def test_l1_to_one():
    model = build_model("smallcnn", 10, 1)
    masks = attach(model, "norm")
    assert float(masks.l1_to_one()) == 0.0
    with torch.no_grad():
        masks.sites[0].mask[:3] = 0.5
    assert float(masks.l1_to_one()) == pytest.approx(1.5)


def test_reset_above_keeps_only_closed_channels():
    masks = attach(build_model("smallcnn", 10, 1), "norm")
    with torch.no_grad():
        masks.sites[0].mask[:4] = torch.tensor([0.1, 0.5, 0.85, 0.95])
    assert masks.reset_above_(0.9) == 3
    assert masks.sites[0].mask[:5].tolist() == pytest.approx([0.1, 0.5, 0.85, 1.0, 1.0])
    assert float(masks.l1_to_one()) == pytest.approx(0.9 + 0.5 + 0.15)


def test_save_load_roundtrip(tmp_path):
    model = build_model("preactresnet18", 10, 3, width=8)
    masks = attach(model, "auto")
    with torch.no_grad():
        for s in masks.sites:
            s.mask.uniform_(0, 1)
    path = tmp_path / "masks.safetensors"
    masks.save(str(path))
    assert path.stat().st_size < 64 * 1024
    other = attach(build_model("preactresnet18", 10, 3, width=8), "auto")
    other.load(str(path))
    assert torch.equal(other.values(), masks.values())
    wrong = attach(build_model("smallcnn", 10, 3), "auto")
    with pytest.raises(NFTError):
        wrong.load(str(path))


def test_detach_restores_weights():
    model = build_model("smallcnn", 10, 1)
    before = copy.deepcopy(model.state_dict())
    masks = attach(model, "auto")
    with torch.no_grad():
        masks.sites[0].mask.fill_(0.1)
    masks.detach()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_attach_twice_refused():
    model = build_model("smallcnn", 10, 1)
    attach(model)
    with pytest.raises(NFTError):
        attach(model)
