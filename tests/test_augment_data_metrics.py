import pytest
import torch

from nft import augment as A
from nft.data import CleanSet, ImageData, stratified_pick
from nft.errors import NFTError
from nft.metrics import accuracy, attack_success_rate, der, robust_accuracy


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mixup_convex_and_targets_sum_to_one():
    x = torch.rand(16, 1, 8, 8, generator=g())
    y = torch.randint(0, 10, (16,), generator=g())
    xm, ym = A.mixup(x, y, 10, 1.0, g(1))
    assert xm.shape == x.shape and ym.shape == (16, 10)
    torch.testing.assert_close(ym.sum(1), torch.ones(16))
    assert xm.min() >= x.min() - 1e-6 and xm.max() <= x.max() + 1e-6
    # each mixed image is lam * x_i + (1 - lam) * x_perm(i): the weight on its own label is lam
    lam = ym[torch.arange(16), y].min()
    assert 0 <= float(lam) <= 1


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_labels_follow_the_pasted_area(seed):
    """Each image i is constant i, so every pixel says where it came from: the label weight on the
    partner's class is exactly the fraction of the partner's pixels, and the rest is untouched."""
    n, H, W = 10, 9, 7
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, H, W).clone()
    y = torch.arange(n)
    xm, ym = A.cutmix(x, y, n, 1.0, g(seed))
    torch.testing.assert_close(ym.sum(1), torch.ones(n))
    for i in range(n):
        src = xm[i].round().long().unique()
        assert len(src) <= 2 and i in src.tolist() or len(src) == 1
        share = {int(c): float((xm[i] == c).float().mean()) for c in src}
        for c, frac in share.items():
            assert float(ym[i, c]) == pytest.approx(frac, abs=1e-6)
    assert torch.equal(A.cutmix(x, y, n, 1.0, g(seed))[0], xm)  # deterministic given the generator


def test_mixup_deterministic_given_generator():
    x = torch.rand(8, 3, 4, 4, generator=g())
    y = torch.arange(8) % 3
    a = A.mixup(x, y, 3, 1.0, g(5))
    b = A.mixup(x, y, 3, 1.0, g(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mixup_loss_equals_seed_form():
    import torch.nn.functional as F

    x = torch.rand(8, 1, 4, 4, generator=g())
    y = torch.arange(8) % 4
    logits = torch.randn(8, 4, generator=g(2))
    gen = g(3)
    lam = A._beta(1.0, gen)
    perm = torch.randperm(8, generator=gen)
    _, ym = A.mixup(x, y, 4, 1.0, g(3))
    seed_loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(F.cross_entropy(logits, ym), seed_loss)


def test_mixup_alpha_zero_is_identity():
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 3])
    xm, ym = A.mixup(x, y, 4, 0.0, g())
    assert torch.equal(xm, x) and torch.equal(ym.argmax(1), y)


def test_shift_moves_pixels_and_keeps_shape():
    x = torch.zeros(64, 1, 10, 10)
    x[:, :, 5, 5] = 1
    out = A.shift(x, 2, g())
    assert out.shape == x.shape
    assert torch.all(out.sum((1, 2, 3)) == 1)  # the pixel stays inside (it was 5 px from the border)
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 10, pos % 10
    assert rows.min() >= 3 and rows.max() <= 7 and len(set(pos.tolist())) > 5


def test_random_patches_only_change_a_square():
    x = torch.full((200, 1, 28, 28), 0.5)
    out = A.random_patches(x, g(), p=0.5, min_size=0.1, max_size=0.25)
    changed = (out != x).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 0.7
    diff = (out != x)[changed][:, 0]
    # the changed pixels of each image lie in a bounding box no larger than 7x7
    for d in diff[:20]:
        r, c = d.nonzero(as_tuple=True)
        assert r.max() - r.min() < 7 and c.max() - c.min() < 7
    assert out.min() >= 0 and out.max() <= 1


def test_affine_keeps_range_moves_mass_and_is_seeded():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1
    out = A.affine(x, g())
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, A.affine(x, g()))  # same generator state, same maps
    centres = (out[:, 0] * torch.arange(28.0)[None, :, None]).sum((1, 2)) / out[:, 0].sum((1, 2))
    assert centres.std() > 0.3  # each image got its own map
    # a map near the identity keeps a square near where it was; its mass within the scale range
    ident = A.affine(x, g(), degrees=0, scale=(1, 1), shear=0, translate=0)
    assert torch.allclose(ident, x, atol=1e-5)
    assert 0.75 < (out.sum((1, 2, 3)) / x.sum((1, 2, 3))).min() and (out.sum((1, 2, 3)) / x.sum((1, 2, 3))).max() < 1.3


def test_flip_and_crop_shapes():
    x = torch.rand(8, 3, 32, 32)
    assert A.flip(x, g()).shape == x.shape
    assert A.crop(x, g()).shape == x.shape
    with pytest.raises(ValueError):
        A.train_transform("nope")


def test_stratified_pick_balanced_and_deterministic():
    y = torch.arange(100) % 5
    idx = stratified_pick(y, 5, per_class=3, seed=1)
    assert len(idx) == 15 and torch.bincount(y[idx]).tolist() == [3] * 5
    assert torch.equal(idx, stratified_pick(y, 5, per_class=3, seed=1))
    assert not torch.equal(idx, stratified_pick(y, 5, per_class=3, seed=2))
    frac = stratified_pick(y, 5, fraction=0.5)
    assert torch.bincount(y[frac]).tolist() == [10] * 5


def test_stratified_pick_errors():
    y = torch.tensor([0, 0, 1])
    with pytest.raises(NFTError, match="only 1"):
        stratified_pick(y, 2, per_class=2)
    with pytest.raises(NFTError, match="class 2"):
        stratified_pick(y, 3, per_class=1)


def test_cleanset_validation():
    x = torch.rand(3, 1, 4, 4)
    with pytest.raises(NFTError, match="fewer"):
        CleanSet(x, torch.tensor([0, 1, 2]), num_classes=4)
    with pytest.raises(NFTError, match="class 2"):
        CleanSet(x, torch.tensor([0, 1, 1]), num_classes=3)
    pool = ImageData((torch.rand(30, 1, 4, 4) * 255).to(torch.uint8), torch.arange(30) % 3)
    cs = CleanSet.pick(pool, 3, per_class=1)
    assert len(cs) == 3 and cs.per_class == 1.0 and cs.x.dtype == torch.float32 and cs.x.max() <= 1


def test_metrics_hand_made():
    pred = torch.tensor([0, 0, 1, 2, 0])
    y = torch.tensor([0, 1, 1, 2, 2])
    assert accuracy(pred, y) == pytest.approx(0.6)
    # triggered non-target images, backdoor label 0
    poison_pred = torch.tensor([0, 0, 3, 1])
    true = torch.tensor([1, 2, 3, 1])
    assert attack_success_rate(poison_pred, torch.zeros(4, dtype=torch.long)) == pytest.approx(0.5)
    assert robust_accuracy(poison_pred, true) == pytest.approx(0.5)
    # DER: ASR 1.0 -> 0.1, ACC 0.9 -> 0.88: (0.9 - 0.02 + 1) / 2
    assert der(0.9, 1.0, 0.88, 0.1) == pytest.approx(0.94)
    assert der(0.9, 1.0, 0.95, 1.0) == pytest.approx(0.5)  # no change in ASR, ACC gain is not rewarded
