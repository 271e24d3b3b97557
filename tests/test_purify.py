"""End-to-end NFT on a tiny backdoored model, in seconds."""
import copy
from dataclasses import replace

import pytest
import torch
from torch.nn.utils import parametrize

from nft.attacks import build_attack
from nft.data import CleanSet, load_dataset
from nft.errors import NFTError
from nft.evaluate import evaluate
from nft.purify import RECIPES, NFTConfig, for_clean_set, make_transform, purify, recipe, validate
from nft.searches import ImagePerturbation, NeuronPerturbation, PatchPerturbation, SparsePerturbation, UniversalPerturbation
from nft.trainer import TrainConfig, train_model


@pytest.fixture(scope="module")
def tiny():
    from nft.runtime import Runtime

    rt = Runtime(device="cpu", seed=0, progress=False)
    data = load_dataset("mnist10k")
    data.train = data.train.subset(torch.arange(0, len(data.train), 3))  # 2,400 images
    data.test = data.test.subset(torch.arange(0, 600))
    attack = build_attack("badnets", num_classes=10, image_shape=data.input_shape)
    model, _ = train_model(data, TrainConfig(arch="smallcnn", arch_kwargs={"width": 8}, epochs=3), rt, attack)
    clean = CleanSet.pick(data.heldout, 10, per_class=10, augment=data.augment)
    return rt, data, attack, model, clean


def test_recipes_exist_and_paper_is_the_seed():
    paper = recipe("paper")
    assert (paper.where, paper.clip_alpha, paper.clip_beta, paper.l1, paper.mixup_alpha) == ("norm", 0.8, 0.5, 1e-3, 1.0)
    assert (paper.lr, paper.momentum, paper.steps, paper.batch_size, paper.train_mode) == (0.05, 0.95, 1000, 128, True)
    assert paper.patches == 0 and paper.adv == 0
    assert set(RECIPES) >= {"paper", "default"}
    with pytest.raises(NFTError):
        recipe("nope")
    with pytest.raises(NFTError):
        recipe("default", not_a_setting=1)


def test_purify_end_to_end(tiny):
    rt, data, attack, model, clean = tiny
    before = evaluate(model, data.test, attack, rt)
    assert before["asr"] > 50  # the tiny model did learn the backdoor
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    cfg = recipe("default", steps=40, batch_size=64, eval_every=20)
    purified, masks, history, extras = purify(model, clean, cfg, rt, monitor=lambda m: seen.append(1) or {"acc": 0.0})
    # the input model is untouched; the output is a plain model with the masks folded in
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(parametrize.is_parametrized(m) for m in purified.modules())
    assert type(purified) is type(model)
    assert extras["num_masks"] > 0 and len(extras["mask_state"]) == len(extras["mask_layout"])
    values = torch.cat([v.flatten() for v in extras["mask_state"].values()])
    assert values.min() < 1.0 and values.max() <= 1.0  # masks moved, and stayed clipped
    lows = [row for row in history if "loss" in row]
    assert lows[-1]["step"] == 40 and len(seen) >= 2
    after = evaluate(purified, data.test, attack, rt)
    assert after["acc"] > before["acc"] - 15  # 40 steps must not wreck the model


@pytest.mark.parametrize("upto", [100, 10, 9, None])
def test_mask_reset_keeps_only_closed_channels_on_small_clean_sets(tiny, upto):
    """One-shot mode: the mask reset (and any other override) applies only up to ``oneshot_upto``."""
    rt, data, attack, model, clean = tiny  # 10 images per class
    cfg = recipe("default", steps=30, batch_size=64, lr=0.5, bn_recal=2, bn_recal_mode="delta", mask_reset=0.0,
                 oneshot_upto=upto, oneshot={"mask_reset": 0.5, "adv_after": 0.25})
    _, _, _, extras = purify(model, clean, cfg, rt)
    assert extras["config"]["adv_after"] == (0.25 if upto not in (9, None) else cfg.adv_after)
    values = torch.cat([v.flatten() for v in extras["mask_state"].values()])
    assert extras["masks_reset"] == (upto not in (9, None))
    moved = values[values < 1.0]
    if extras["masks_reset"]:
        assert len(moved) > 0 and moved.max() <= 0.5  # a mask is either closed or back at 1
    else:
        assert ((moved > 0.5) & (moved < 1.0)).any()  # not reset: small moves stay


def test_settings_the_caller_gives_win_over_one_shot_mode():
    """``default``'s one-shot mode changes the schedule; a caller's own steps or lr stay what the caller said."""
    one = for_clean_set(recipe("default"), 1)
    assert (one.steps, one.lr) == (RECIPES["default"]["oneshot"]["steps"], RECIPES["default"]["oneshot"]["lr"])
    assert (one.steps, one.lr) != (recipe("default").steps, recipe("default").lr)
    mine = for_clean_set(recipe("default", steps=100, lr=0.05), 1)
    assert (mine.steps, mine.lr, mine.adv_until) == (100, 0.05, RECIPES["default"]["oneshot"]["adv_until"])
    assert for_clean_set(recipe("default", steps=100), 50).steps == 100
    assert for_clean_set(recipe("default", oneshot={"steps": 7}, steps=100), 1).steps == 7  # an explicit oneshot wins


def test_hold_below_keeps_closed_masks_closed_after_the_search(tiny):
    rt, data, attack, model, clean = tiny
    seen = {}

    def monitor(m):  # the masks are the only trainable tensors of the model being purified
        seen[len(seen)] = [p.detach().clone() for p in m.parameters() if p.requires_grad]
        return {}

    cfg = recipe("default", steps=30, batch_size=64, lr=0.5, adv_until=1 / 3, hold_below=0.7, eval_every=10,
                 oneshot={})
    purify(model, clean, cfg, rt, monitor=monitor)
    at_end_of_search, last = seen[1], seen[3]  # steps 10 (the search ends) and 30; 0 is before training
    held = [m <= 0.7 for m in at_end_of_search]
    assert sum(int(h.sum()) for h in held) > 0
    for a, b, h in zip(at_end_of_search, last, held):
        assert torch.equal(a[h], b[h])
    assert any(not torch.equal(a[~h], b[~h]) for a, b, h in zip(at_end_of_search, last, held))


def test_bn_delta_transfer_keeps_own_statistics_when_nothing_changed(tiny):
    rt, data, attack, model, clean = tiny
    from nft.purify import transfer_bn_delta

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(10))
    net(clean.x[:2]).sum()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    cfg = recipe("default", bn_recal=3, bn_recal_mode="delta", batch_size=16)
    same = copy.deepcopy(net)
    transfer_bn_delta(net, same, clean, cfg, rt)  # nothing changed: the model keeps its own statistics
    for a, b in zip(net.modules(), same.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
            assert torch.allclose(a.running_var, b.running_var, rtol=1e-4)
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled[0].weight.mul_(2)
        scaled[0].bias.mul_(2)  # the first BN's input doubles: its mean x2 shift, its variance x4
    ref = copy.deepcopy(net)
    transfer_bn_delta(net, scaled, clean, cfg, rt)
    from nft.purify import recalibrate_bn

    recalibrate_bn(ref, clean, cfg, rt)
    bn0, bn_ref = scaled[1], ref[1]
    assert torch.allclose(bn0.running_mean, net[1].running_mean + bn_ref.running_mean, atol=1e-4)
    assert torch.allclose(bn0.running_var, net[1].running_var * 4, rtol=1e-3)


def test_bn_step_with_a_perturbed_share_edits_only_the_purified_models_batches(tiny):
    """bn_recal_adv: the last share of each batch carries each search's perturbation in turn; the original's
    estimate in the delta step stays plain, so a perturbation that changes nothing leaves the statistics alone."""
    rt, data, attack, model, clean = tiny
    from nft.bn import perturbed_share, reestimate_bn

    class Shift:
        def __init__(self, by):
            self.by = by

        def apply(self, x):
            return x + self.by

    f = perturbed_share([Shift(1.0), None, Shift(2.0)], 0.25)
    x = torch.zeros(8, 1, 2, 2)
    assert f(x).flatten(1)[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert perturbed_share([Shift(1.0)], 0.0) is None and perturbed_share([None, object()], 0.5) is None
    cfg = recipe("default", bn_recal=3, bn_recal_mode="delta", batch_size=16, bn_recal_adv=0.5)
    stats = lambda m: torch.cat([b.running_mean for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)])  # noqa: E731
    plain, same, moved = (copy.deepcopy(model) for _ in range(3))
    reestimate_bn(model, plain, clean, replace(cfg, bn_recal_adv=0.0), rt)
    reestimate_bn(model, same, clean, cfg, rt, (Shift(0.0),))
    reestimate_bn(model, moved, clean, cfg, rt, (Shift(0.5),))
    assert torch.allclose(stats(plain), stats(same), atol=1e-5) and not torch.allclose(stats(plain), stats(moved))
    with pytest.raises(NFTError, match="bn_recal_adv"):
        validate(recipe("default", bn_recal=0, mask_reset=0, recover_gap=0, bn_recal_adv=0.5))


def test_targeted_probe_names_the_class_a_shortcut_reaches():
    """A model whose class 2 fires on overall brightness (a global trigger): a small targeted search reaches it from
    every image, no other class; purify runs the probe first (for recover_target_keep) and records it."""
    from nft.searches import targeted_probe

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[2] = 40.0 / 64
        lin.bias.copy_(torch.tensor([2.0, 0.5, -3.0]))
    hidden = torch.nn.Linear(64, 64)  # the identity on [0, 1] images: a layer NFT can mask
    with torch.no_grad():
        hidden.weight.copy_(torch.eye(64))
        hidden.bias.zero_()
    net = torch.nn.Sequential(torch.nn.Flatten(), hidden, torch.nn.ReLU(), lin)
    x = torch.rand(30, 1, 8, 8) * 0.2
    y = net(x).argmax(1)
    assert (y == 0).all()
    out = targeted_probe(net, x, y, 3, 0.15, 0.25, 20, 16, torch.Generator().manual_seed(0))
    assert out["to"] == 2 and out["rates"][2] == 100.0 and out["rates"][1] == 0.0 and out["margin"] == 100.0
    clean = CleanSet(x, torch.arange(30) % 3, 3, augment="none")  # every class present (the model reads them all as 0)
    _, _, _, extras = purify(net, clean, recipe("default", steps=2, batch_size=8, target_probe=0.15,
                                                target_probe_steps=20, recover_target_keep=0.5, bn_recal=0,
                                                recover_gap=0, patch_probe=0, composites=0, where="auto",
                                                neuron=0, oneshot_upto=None))
    probe = extras["target_probe"]
    assert len(probe["rates"]) == 3 and probe["rates"][1] == 0.0 and probe["to"] in (0, 2)


def test_relapse_guard_keeps_the_perturbation_during_recovery():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    clean = CleanSet(torch.rand(12, 1, 8, 8), torch.arange(12) % 3, 3, augment="none")
    cfg = recipe("default", steps=4, batch_size=8, adv=0.5, adv_until=0.5, adv_after=0.25, adv_frozen=True)
    t = make_transform(cfg, clean, torch.Generator().manual_seed(1), net)
    sizes, deltas = [], []
    for step in (1, 2, 3, 4):
        xb, yb = t(clean.x[:8], clean.y[:8], step)
        sizes.append(len(xb))
        # the extra images are the clean ones plus the current delta, clamped to [0, 1]
        extra = xb[8:]
        deltas.append((extra - clean.x[: len(extra)]).clone())
    assert sizes == [12, 12, 10, 10]  # 4 searched images, then 2 guard images
    assert not torch.allclose(deltas[0], deltas[1][: len(deltas[0])])  # the search moves delta
    assert torch.allclose(deltas[2], deltas[3])  # recovery: delta frozen
    off = make_transform(recipe("default", steps=4, batch_size=8, adv_after=0.0), clean,
                         torch.Generator().manual_seed(1), net)
    assert len(off(clean.x[:8], clean.y[:8], 3)[0]) == 8  # without the guard, recovery is MixUp only
    assert recipe("default").adv_after > 0 and recipe("paper").adv_after == 0
    live = make_transform(replace(cfg, adv_frozen=False), clean, torch.Generator().manual_seed(1), net)
    moved = [(live(clean.x[:8], clean.y[:8], s)[0][8:10] - clean.x[:2]).clone() for s in (1, 2, 3, 4)]
    assert not torch.allclose(moved[2], moved[3])  # not frozen: the search goes on during recovery


def test_image_perturbation_stays_in_each_ball_and_raises_the_loss():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(6, 3, 8, 8, generator=g) * 0.5 + 0.25  # room on both sides: no clamping
    y = torch.randint(0, 4, (6,), generator=g)
    p = ImagePerturbation((3, 8, 8), 0.1, 3, g)
    xa = p.update(model, x, y)
    norms = (xa - x).flatten(1).norm(dim=1)
    assert (norms <= p.radius + 1e-5).all() and (norms > 0.5 * p.radius).all()
    assert len(set(torch.round((xa - x).flatten(1)[:, 0], decimals=5).tolist())) > 1  # one delta per image
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        after = torch.nn.functional.cross_entropy(model(xa), y, reduction="none")
    assert (after > before).all()  # every image's own perturbation raised its own loss


def test_free_ascent_is_the_same_search_step():
    """adv_free takes the perturbation's step from the training backward: on a model without BN (train
    and eval mode agree) and a loss on the perturbed images only, it is exactly the separate search step."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6) % 3
    a, b = (UniversalPerturbation((1, 8, 8), 0.15, 0.25, "cpu", torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.delta, b.delta)
    a.update(net, x, y)
    torch.nn.functional.cross_entropy(net(b.attach(x)), y).backward()
    b.ascend()
    assert not torch.equal(b.delta, UniversalPerturbation((1, 8, 8), 0.15, 0.25, "cpu",
                                                          torch.Generator().manual_seed(3)).delta)
    assert torch.allclose(a.delta, b.delta, atol=1e-6)
    assert float(b.delta.norm()) <= b.radius * (1 + 1e-5)
    b.ascend()  # no pending gradient: nothing moves
    assert torch.allclose(a.delta, b.delta, atol=1e-6)


def test_several_starts_keep_one_delta_per_start_each_in_its_ball():
    """adv_starts=K: K deltas from independent starts, image i carries delta i mod K, each delta
    moves by its own images' gradient alone and stays in the ball."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x, y = torch.rand(7, 1, 8, 8), torch.arange(7) % 3
    u = UniversalPerturbation((1, 8, 8), 0.15, 0.25, "cpu", torch.Generator().manual_seed(3), starts=3)
    assert u.delta.shape == (3, 1, 8, 8) and not torch.allclose(u.delta[0], u.delta[1])
    for _ in range(6):
        before = u.delta.clone()
        out = u.update(net, x, y)
        assert torch.equal(out, (x + u.delta[torch.arange(7) % 3]).clamp(0, 1))
        assert (u.delta.flatten(1).norm(dim=1) <= u.radius * (1 + 1e-5)).all()
    # delta 2 sees images 2 and 5 only: a single-start search on those images takes the same step
    solo = UniversalPerturbation((1, 8, 8), 0.15, 0.25, "cpu", torch.Generator().manual_seed(3))
    solo.delta = before[2].unsqueeze(0).clone()
    solo.update(net, x[[2, 5]], y[[2, 5]])
    assert torch.allclose(solo.delta[0], u.delta[2], atol=1e-6)
    assert len(make_transform(recipe("default", steps=4, batch_size=8, adv_starts=3),
                              CleanSet(x, y, 3, augment="none"), torch.Generator().manual_seed(1), net)(x, y, 1)[0]) == 7 + 4


def test_l1_projection_is_the_nearest_point_of_the_ball():
    """SparsePerturbation's projection is Euclidean projection onto the L1 ball: a point inside stays,
    a point outside lands on the sphere at the soft-threshold a bisection finds, one threshold per delta."""
    u = SparsePerturbation((1, 8, 8), 0.1, 0.25, "cpu", torch.Generator().manual_seed(0), starts=2)
    assert u.radius == pytest.approx(6.4) and u.k == 7
    assert u.delta.flatten(1).abs().sum(1).tolist() == pytest.approx([3.2, 3.2])
    d = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    d[1] *= 0.01  # inside the ball
    p = u._project(d, u.radius)
    assert torch.equal(p[1], d[1])
    assert float(p[0].abs().sum()) == pytest.approx(u.radius, rel=1e-5)
    lo, hi = 0.0, float(d[0].abs().max())
    for _ in range(60):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if float((d[0].abs() - t).clamp_min(0).sum()) > u.radius else (lo, t)
    assert torch.allclose(p[0], d[0].sign() * (d[0].abs() - hi).clamp_min(0), atol=1e-5)


def test_l1_search_finds_a_patch_trigger_with_a_sparse_delta():
    """On a model that answers class 1 exactly when a 2x2 corner patch is bright, the L1 search (adv_norm
    'l1') drives clean images there and its delta ends concentrated on the patch; it stays in the ball."""
    torch.manual_seed(0)
    w = torch.zeros(2, 1, 8, 8)
    w[1, 0, :2, :2] = 4.0
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with torch.no_grad():
        net[1].weight.copy_(w.flatten(1))
        net[1].bias.copy_(torch.tensor([4.0, 0.0]))
    x, y = torch.rand(16, 1, 8, 8) * 0.2, torch.zeros(16, dtype=torch.long)
    u = SparsePerturbation((1, 8, 8), 4 / 64, 0.25, "cpu", torch.Generator().manual_seed(3))
    assert (net(u.apply(x)).argmax(1) == 0).all()
    assert int((u.delta != 0).sum()) == 64
    for _ in range(20):
        u.update(net, x, y)
        assert float(u.delta.abs().sum()) <= u.radius * (1 + 1e-5)
    assert (net(u.apply(x)).argmax(1) == 1).all()
    assert int((u.delta != 0).sum()) <= 8  # the projection's soft threshold left a sparse delta
    assert float(u.delta[0, 0, :2, :2].sum()) > 0.9 * float(u.delta.clamp_min(0).sum())
    cfg = recipe("default", steps=4, batch_size=8, adv_norm="l1", adv_eps=0.05)
    assert isinstance(make_transform(cfg, CleanSet(x, torch.arange(16) % 2, 2, augment="none"),
                                     torch.Generator().manual_seed(1), net).adv,
                      SparsePerturbation)


def test_patch_search_windows_tile_the_corners_and_find_a_corner_trigger():
    """PatchPerturbation: grid 2 puts one window in each corner; every pattern is zero outside its window and
    in the pixel range, and the image is kept outside the window; on a model that answers class 1 exactly when the bottom-right 2x2 square is bright,
    the images carrying that corner's window go to class 1 and the others do not (the search does not
    invent a trigger where there is none); wide_norm='patch' makes it NFT's second search."""
    w = torch.zeros(2, 1, 8, 8)
    w[1, 0, 6:, 6:] = 4.0
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with torch.no_grad():
        net[1].weight.copy_(w.flatten(1))
        net[1].bias.copy_(torch.tensor([8.0, 0.0]))
    u = PatchPerturbation((1, 8, 8), 0.25, 2, 0.2, "cpu", torch.Generator().manual_seed(3))
    assert u.side == 2 and u.window.shape == (4, 1, 8, 8)
    corners = [(0, 0), (0, 6), (6, 0), (6, 6)]
    for win, (r, c) in zip(u.window, corners):
        assert float(win.sum()) == 4 and float(win[0, r:r + 2, c:c + 2].sum()) == 4
    x, y = torch.rand(16, 1, 8, 8) * 0.2, torch.zeros(16, dtype=torch.long)
    for _ in range(10):
        xa = u.update(net, x, y)
        assert float(xa.min()) >= 0 and float(xa.max()) <= 1
        assert torch.equal(xa * (1 - u.window[torch.arange(16) % 4]), x * (1 - u.window[torch.arange(16) % 4]))
        assert 0 <= float(u.pattern.min()) and float(u.pattern.max()) <= 1
        assert float((u.pattern * (1 - u.window)).abs().sum()) == 0
    pred = net(u.apply(x)).argmax(1)
    assert (pred[3::4] == 1).all() and (pred[torch.arange(16) % 4 != 3] == 0).all()
    cfg = recipe("default", steps=4, batch_size=8, wide=0.5, wide_norm="patch", wide_grid=2)
    assert isinstance(make_transform(cfg, CleanSet(x, torch.arange(16) % 2, 2, augment="none"),
                                     torch.Generator().manual_seed(1), net).wide, PatchPerturbation)


def test_neuron_perturbation_raises_the_loss_stays_bounded_and_is_removed():
    from nft.masks import attach

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 3))
    net.eval()
    with torch.no_grad():
        net[1].bias.normal_()  # a trained BN's bias, not the zero init (relative noise on 0 is 0)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 3
    masks = attach(net, "auto")
    with torch.no_grad():
        masks.sites[0].mask[:2] = 0.0  # two closed channels
        clean = torch.nn.functional.cross_entropy(net(x), y)
    seen = []
    real_set = masks.set_noise
    masks.set_noise = lambda noise, bias=None: (seen.append((noise, bias)), real_set(noise, bias))[1]
    p = NeuronPerturbation(masks, 0.4, 2, torch.Generator().manual_seed(1))
    robust = p.loss(net, x, y)
    assert float(robust.detach()) > float(clean)  # the ascent found a worse network near this one
    final, final_bias = seen[-2]  # the last perturbation set before the finally-clause removed it
    assert all(float(n.abs().max()) <= 0.4 + 1e-6 for n in final)
    assert final_bias[0] is not None and final_bias[1] is None  # bias noise on the norm site only
    assert float(final_bias[0].abs().max()) <= 0.4 + 1e-6
    assert seen[-1] == (None, None)  # removed: the masked model is itself again
    with torch.no_grad():
        assert torch.equal(net(x), net(x)) and float(torch.nn.functional.cross_entropy(net(x), y)) == float(clean)
        masks.set_noise(final, final_bias)
        w, b = net[1].weight.clone(), net[1].bias.clone()  # the BN's masked gamma and its bias under the noise
        masks.set_noise(None)
        assert not torch.equal(b, net[1].bias)
        assert torch.equal(w[:2], torch.zeros(2))  # closed channels stay closed under any noise
        assert not torch.equal(w[2:], net[1].weight[2:])  # the open ones moved
    robust.backward()  # the robust loss trains the masks
    assert masks.sites[0].mask.grad is not None


def test_purify_with_neuron_perturbation_runs_and_changes_the_masks(tiny):
    rt, data, attack, model, clean = tiny
    cfg = recipe("default", steps=12, batch_size=32)
    assert cfg.neuron == 0.5 and recipe("paper").neuron == 0  # the default searches in neuron space too
    a = purify(model, clean, replace(cfg, neuron=0.0), rt)[3]["mask_state"]
    b = purify(model, clean, cfg, rt)[3]["mask_state"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_weight_masks_with_adam_purify_and_move_single_weights(tiny):
    """where='weight' learns one mask per conv weight (beside the norm masks); Adam moves each by
    about its lr, where SGD at the same lr barely moves a single weight's mask."""
    rt, data, attack, model, clean = tiny
    cfg = recipe("default", steps=6, batch_size=32, where="weight", optimizer="adam", lr=0.01)
    purified, masks, _, ex = purify(model, clean, cfg, rt)
    state = ex["mask_state"]
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(convs) <= set(state) and all(state[n].shape == m.weight.shape for n, m in convs.items())
    step = lambda st: float(torch.cat([(1 - st[n]).abs().flatten() for n in convs]).mean())  # noqa: E731
    sgd = purify(model, clean, replace(cfg, optimizer="sgd"), rt)[3]["mask_state"]
    assert step(state) > 10 * step(sgd)  # Adam: per-entry steps of about lr; SGD: lr times a tiny gradient
    assert ex["num_masks"] == sum(t.numel() for t in state.values())
    assert not any("parametrizations" in k for k in purified.state_dict())


class FixedNeuronLoss:  # a neuron perturbation whose loss is a known constant
    def loss(self, model, x, y):
        return torch.tensor(10.0)


def test_neuron_weight_after_the_search_is_neuron_after():
    """make_loss mixes in the perturbed loss with weight ``neuron`` up to neuron_until, then
    ``neuron_after``: the total is exactly (1 - w) clean + w perturbed, with the perturbed value given."""
    from nft.purify import make_loss

    net = torch.nn.Linear(4, 3)
    x, y = torch.rand(8, 4), torch.softmax(torch.rand(8, 3), 1)
    clean = float(torch.nn.functional.cross_entropy(net(x), y).detach())
    transform = lambda: None  # noqa: E731
    transform.clean = 0
    for after in (0.0, 0.25):
        cfg = recipe("default", steps=100, neuron_until=0.5, neuron_after=after)
        loss = make_loss(cfg, None, transform, FixedNeuronLoss())
        assert float(loss(net, x, y, 50).detach()) == pytest.approx(0.5 * clean + 0.5 * 10)
        assert float(loss(net, x, y, 51).detach()) == pytest.approx((1 - after) * clean + after * 10)
    with pytest.raises(NFTError, match="neuron_after"):
        recipe("paper", neuron_after=0.25)  # no neuron search to continue


def test_rounds_repeat_the_search_then_recovery_schedule():
    """One round is the old rule (step <= until * steps); two rounds search the first half of each half, for both
    searches; the recovery check's steps past ``steps`` never search."""
    from nft.nft_config import searching
    from nft.purify import make_loss

    one, two = recipe("default", steps=200), recipe("default", steps=200, rounds=2)
    assert [s for s in range(1, 201) if searching(one, s, 0.5)] == list(range(1, 101))
    assert [s for s in range(1, 201) if searching(two, s, 0.5)] == list(range(1, 51)) + list(range(101, 151))
    assert not searching(two, 201, 1.0) and searching(two, 200, 1.0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    clean = CleanSet(torch.rand(12, 1, 8, 8), torch.arange(12) % 3, 3, augment="none")
    cfg = recipe("default", steps=8, batch_size=8, adv=0.5, adv_until=0.5, adv_after=0.0, rounds=2)
    t = make_transform(cfg, clean, torch.Generator().manual_seed(1), net)
    assert [len(t(clean.x[:8], clean.y[:8], s)[0]) for s in range(1, 9)] == [12, 12, 8, 8, 12, 12, 8, 8]

    x, y = torch.rand(8, 4), torch.softmax(torch.rand(8, 3), 1)
    lin = torch.nn.Linear(4, 3)
    plain = float(torch.nn.functional.cross_entropy(lin(x), y).detach())
    transform = lambda: None  # noqa: E731
    transform.clean = 0
    loss = make_loss(replace(cfg, neuron=0.5, neuron_until=0.5), None, transform, FixedNeuronLoss())
    assert [round(float(loss(lin, x, y, s).detach()), 4) for s in (2, 3, 6, 7)] == \
        [round(0.5 * plain + 5, 4), round(plain, 4), round(0.5 * plain + 5, 4), round(plain, 4)]


def test_search_target_is_where_the_perturbation_sends_images_and_recovery_can_leave_its_images_out():
    """The universal search counts where it sends images of other classes; with recover_target_keep=0, recovery's
    batches hold no clean image of that class (the search's batches still do), with 1 all of them."""

    class ToTwo(torch.nn.Module):  # sends anything to class 2
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.shift = 0.0  # added to class 2's logit

        def forward(self, x):
            out = torch.zeros(len(x), 3) + self.w * x.flatten(1).sum(1, keepdim=True)
            out[:, 2] += 5 + self.shift
            return out

    net = ToTwo()
    clean = CleanSet(torch.rand(12, 1, 8, 8), torch.arange(12) % 3, 3, augment="none")
    cfg = recipe("default", steps=4, batch_size=12, adv=0.5, adv_until=0.5, adv_after=0.0, recover_target_keep=0.0)
    t = make_transform(cfg, clean, torch.Generator().manual_seed(1), net)
    assert t.adv.target is None  # nothing searched yet
    sizes = [len(t(clean.x, clean.y, s)[0]) for s in (1, 2, 3, 4)]
    assert t.adv.target == 2 and int(t.adv.votes[2]) == 2 * 4 and int(t.adv.votes[:2].sum()) == 0
    assert sizes == [18, 18, 8, 8]  # 12 clean + 6 perturbed while searching; then the 8 clean images not of class 2
    off = make_transform(replace(cfg, recover_target_keep=1.0), clean, torch.Generator().manual_seed(1), net)
    assert [len(off(clean.x, clean.y, s)[0]) for s in (1, 2, 3, 4)] == [18, 18, 12, 12]
    half = make_transform(replace(cfg, recover_target_keep=0.5), clean, torch.Generator().manual_seed(1), net)
    assert [len(half(clean.x, clean.y, s)[0]) for s in (1, 2)] == [18, 18]
    assert 8 <= len(half(clean.x, clean.y, 3)[0]) <= 12
    with pytest.raises(NFTError, match="recover_target_keep"):
        recipe("paper", recover_target_keep=0.0)  # no input search, no target
    with pytest.raises(NFTError, match="recover_target_keep"):
        recipe("default", recover_target_keep=1.5)

    # recover_target_gap: the class's images all stay while the model is behind the original on them
    gated = make_transform(replace(cfg, recover_target_gap=0.0), clean, torch.Generator().manual_seed(1), net)
    assert [len(gated(clean.x, clean.y, s)[0]) for s in (1, 2, 3)] == [18, 18, 8]  # class 2 at 100 as the original
    net.shift = -10.0  # now every image goes to class 0: class 2 at 0 against the original's 100
    assert len(gated(clean.x, clean.y, 4)[0]) == 12
    net.shift = 0.0
    assert len(gated(clean.x, clean.y, 4)[0]) == 8
    with pytest.raises(NFTError, match="recover_target_gap"):
        recipe("default", recover_target_gap=0.0)  # needs recover_target_keep < 1


def test_away_loss_pushes_only_the_perturbations_class_down():
    """away_loss is -log(1 - p_t) over the images not of t, t the class most are predicted as; the
    'away' loss gives it to the rows after ``transform.clean`` and cross-entropy to the clean rows."""
    from nft.purify import away_loss, make_loss

    out = torch.tensor([[0.0, 3.0, 0.0], [0.0, 2.0, 1.0], [0.0, 4.0, 0.0], [5.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2, 1, 0])  # t = 1 (three of four predicted 1); the image of class 1 does not count
    p = torch.softmax(out, 1)
    want = -(torch.log(1 - p[0, 1]) + torch.log(1 - p[1, 1]) + torch.log(1 - p[3, 1])) / 3
    got = away_loss(out, torch.nn.functional.one_hot(y, 3).float())
    assert float(got.detach()) == pytest.approx(float(want.detach()))
    (grad,) = torch.autograd.grad(got, out)
    assert (grad[:, 1][[0, 1, 3]] > 0).all() and (grad[[0, 1, 3]][:, [0, 2]] <= 0).all()  # only t is pushed down
    assert grad[2].abs().sum() == 0  # the image of class t is left alone
    # every image is of class t: nothing to push, a zero loss that still backpropagates
    assert float(away_loss(out, torch.ones(4, dtype=torch.long))) == 0.0
    # flipped: image 3 (label 0) is no longer predicted t = 1, so only images 0 and 1 push (over the same 3)
    want = -(torch.log(1 - p[0, 1]) + torch.log(1 - p[1, 1])) / 3
    got = away_loss(out, y, flipped=True)
    assert float(got.detach()) == pytest.approx(float(want.detach()))
    assert torch.autograd.grad(got, out)[0][3].abs().sum() == 0

    net = torch.nn.Linear(4, 3)
    x, yy = torch.rand(6, 4), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    transform = lambda: None  # noqa: E731
    transform.clean = 4  # rows 4: carry the perturbation
    cfg = recipe("paper", adv_loss="away")
    o = net(x)
    expect = (4 * torch.nn.functional.cross_entropy(o[:4], yy[:4]) + 2 * away_loss(o[4:], yy[4:])) / 6
    assert float(make_loss(cfg, None, transform)(net, x, yy, 1).detach()) == pytest.approx(float(expect.detach()))
    transform.clean = 6  # no perturbed rows: plain cross-entropy
    assert float(make_loss(cfg, None, transform)(net, x, yy, 1).detach()) == pytest.approx(
        float(torch.nn.functional.cross_entropy(o, yy).detach()))


def test_purify_with_the_away_loss_runs_and_differs(tiny):
    rt, data, attack, model, clean = tiny
    cfg = recipe("default", steps=8, batch_size=32)
    a = purify(model, clean, cfg, rt)[3]["mask_state"]
    b = purify(model, clean, replace(cfg, adv_loss="away", patch_probe=0.0), rt)[3]["mask_state"]  # (no patch search)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_wide_rows_take_the_away_loss_and_stay_out_of_the_neuron_loss():
    """With ``wide``, the ``transform.away`` rows just before the composites take away_loss, every
    other row cross-entropy; the neuron-perturbed loss never sees the wide rows."""
    from nft.purify import away_loss, make_loss

    net = torch.nn.Linear(4, 3)
    x, yy = torch.rand(8, 4), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 3).float()
    transform = lambda: None  # noqa: E731
    transform.clean, transform.away, transform.extra = 4, 2, 1  # rows 4-5: first search, 5-6: wide, 7: composite
    cfg = recipe("paper", wide=0.5)
    o = net(x)
    ce = torch.nn.functional.cross_entropy
    rest = [0, 1, 2, 3, 4, 7]
    expect = (ce(o[rest], yy[rest], reduction="sum") + 2 * away_loss(o[5:7], yy[5:7])) / 8
    assert float(make_loss(cfg, None, transform)(net, x, yy, 1).detach()) == pytest.approx(float(expect.detach()))
    transform.away = 0  # no wide rows in this batch: plain cross-entropy
    assert float(make_loss(cfg, None, transform)(net, x, yy, 1).detach()) == pytest.approx(float(ce(o, yy).detach()))

    class Spy:  # stands in for NeuronPerturbation: records the rows it is given
        seen = None

        def loss(self, model, xs, ys):
            Spy.seen = xs
            return ce(model(xs), ys)

    transform.away = 2
    make_loss(replace(recipe("paper", wide=0.5), neuron=0.5), None, transform, Spy())(net, x, yy, 1)
    assert torch.equal(Spy.seen, x[rest])


def test_wide_rows_in_eval_mode_leave_the_batch_statistics_to_the_other_rows():
    """``wide_bn='eval'``: the wide rows pass BatchNorm with the running statistics, so the running
    statistics move exactly as they would on the other rows alone; the loss is the same formula."""
    from nft.purify import away_loss, make_loss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)).train()
    ref = copy.deepcopy(net)
    x, yy = torch.rand(8, 4), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 3).float()
    x[5:7] += 10  # wide rows far from the rest: in the batch statistics they would move the running mean a lot
    transform = lambda: None  # noqa: E731
    transform.clean, transform.away, transform.extra = 4, 2, 1
    rest = [0, 1, 2, 3, 4, 7]
    got = make_loss(recipe("paper", wide=0.5, wide_bn="eval"), None, transform)(net, x, yy, 1)
    o_rest = ref(x[rest])
    ref.eval()
    want = (torch.nn.functional.cross_entropy(o_rest, yy[rest], reduction="sum") + 2 * away_loss(ref(x[5:7]), yy[5:7])) / 8
    assert float(got.detach()) == pytest.approx(float(want.detach()))
    assert torch.allclose(net[1].running_mean, ref[1].running_mean) and net.training


def test_wide_search_adds_its_rows_in_a_wider_ball(tiny):
    rt, data, attack, model, clean = tiny
    cfg = recipe("default", wide=0.25, wide_eps=0.3, steps=8, batch_size=32, composites=0)
    g = torch.Generator().manual_seed(0)
    t = make_transform(cfg, clean, g, model)
    x, y = clean.x[:32], clean.y[:32]
    xm, ym = t(x, y, 1)
    assert (t.clean, t.away) == (32, 8) and len(xm) == 32 + 16 + 8
    assert t.wide.radius == pytest.approx(0.3 * 28) and t.adv.radius == pytest.approx(0.15 * 28)
    assert 0 < float(t.wide.delta.norm()) <= t.wide.radius * (1 + 1e-5)  # one step taken, inside its ball
    xm, _ = t(x, y, 8)  # recovery: adv_after of the batch for each search
    assert t.away == 2 and len(xm) == 32 + 2 + 2
    a = purify(model, clean, replace(cfg, wide=0), rt)[3]["mask_state"]
    b = purify(model, clean, cfg, rt)[3]["mask_state"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


class _CompositeToy(torch.nn.Module):
    """Images of class c are constant c / 10. The model reads an image as the class of its top-left
    pixel, except that an image holding both the values of classes 1 and 2 is read as 0: a composite
    backdoor with pair {1, 2} and target 0."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        q = (x * 10).round().long().flatten(1)
        pred = q[:, 0].clone()
        both = ((q == 1).any(1) & (q == 2).any(1))
        pred[both] = 0
        return torch.nn.functional.one_hot(pred, 10).float() + 0 * self.dummy


def _constant_clean(per_class=3):
    y = torch.arange(10).repeat_interleave(per_class)
    return CleanSet(y.float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8) / 10, y, 10, augment="shift")


def test_composite_probe_flags_the_pair_a_model_reads_as_a_third_class():
    from nft.searches import composite_probe

    clean = _constant_clean()
    out = composite_probe(_CompositeToy(), clean.x, clean.y, 10, 16, 0.7, torch.Generator().manual_seed(0))
    assert out["probed"] == 45 and out["pairs"] == [(1, 2, 0, 1.0)] and out["top"] == (1, 2, 0, 1.0)
    # pairs beyond max_pairs: a random subset is probed
    assert composite_probe(_CompositeToy(), clean.x, clean.y, 10, 4, 0.7, torch.Generator().manual_seed(0),
                           max_pairs=10)["probed"] == 10


def test_composites_join_the_batch_labelled_half_each_class():
    clean = _constant_clean()
    cfg = recipe("paper", composites=0.25)
    t = make_transform(cfg, clean, torch.Generator().manual_seed(0), None, [(1, 2, 0, 1.0)], torch.Generator().manual_seed(1))
    x, y = t(clean.x[:8], clean.y[:8], 1)
    assert t.extra == 2 and len(x) == 10
    for img, lab in zip(x[-2:], y[-2:]):
        assert set((img * 10).round().long().unique().tolist()) == {1, 2}  # one half of each class
        assert torch.allclose(lab, 0.5 * torch.nn.functional.one_hot(torch.tensor(1), 10).float()
                              + 0.5 * torch.nn.functional.one_hot(torch.tensor(2), 10).float())
    t = make_transform(cfg, clean, torch.Generator().manual_seed(0), None, [], None)  # nothing flagged
    assert len(t(clean.x[:8], clean.y[:8], 1)[0]) == 8 and t.extra == 0


def test_composite_probe_that_finds_nothing_changes_nothing(tiny, monkeypatch):
    """The probe leaves the model as it was (eval mode, no gradient, its own generator). The tiny
    BadNets model here (3 epochs on 2,400 images) reads most pairs' composites as one class, so no
    pair is an outlier and nothing is flagged: NFT's masks are bit for bit those of a run without
    the probe. When a pair is flagged, composite_found's settings apply."""
    import nft.purify as P
    from nft.searches import composite_probe

    rt, data, attack, model, clean = tiny
    m = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = composite_probe(m, clean.x, clean.y, 10, 64, 0.7, torch.Generator().manual_seed(0))
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert out["pairs"] == [] and out["top"][3] >= 0.7 and out["median"] >= 0.5  # high shares, no outlier
    cfg = recipe("default", steps=6, batch_size=32)
    assert cfg.composites > 0  # the default probes
    a = purify(model, clean, replace(cfg, composites=0.0), rt)[3]
    b = purify(model, clean, cfg, rt)[3]
    assert b["composite_probe"]["pairs"] == [] and b["config"]["where"] == "auto"
    assert all(torch.equal(a["mask_state"][k], b["mask_state"][k]) for k in a["mask_state"])
    monkeypatch.setattr(P, "composite_probe", lambda *args: {"pairs": [(1, 2, 0, 1.0)], "top": (1, 2, 0, 1.0), "probed": 45})
    c = purify(model, clean, cfg, rt)[3]
    assert c["config"]["where"] == "weight" and c["config"]["optimizer"] == "adam" and c["config"]["lr"] == 0.01
    assert set(c["mask_state"]) > set(a["mask_state"])  # per-weight masks beside the channel ones


def test_patch_probe_flags_the_trigger_window_only_on_a_model_with_a_patch_trigger():
    """On a model that answers class 1 when its bottom-right 2x2 square is bright, the probe's bottom-right
    window sends every image of class 0 there and no other window does; on the same model without that
    route no window moves any image. It leaves the model's mode and weights as they were."""
    from nft.searches import patch_probe

    def net(trigger):
        w = torch.zeros(2, 1, 8, 8)
        w[1, 0, 6:, 6:] = 4.0 if trigger else 0.0
        n = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        with torch.no_grad():
            n[1].weight.copy_(w.flatten(1))
            n[1].bias.copy_(torch.tensor([8.0, 0.0]))
        return n.train()

    x, y = torch.rand(32, 1, 8, 8) * 0.2, torch.zeros(32, dtype=torch.long)
    m = net(True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = patch_probe(m, x, y, 0.25, 2, 0.2, 10, 16, torch.Generator().manual_seed(0))
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert (out["window"], out["to"], out["share"]) == (3, 1, 1.0)
    assert [s for s, _ in out["windows"][:3]] == [0.0, 0.0, 0.0]
    assert patch_probe(net(False), x, y, 0.25, 2, 0.2, 10, 16, torch.Generator().manual_seed(0))["share"] == 0.0


def test_the_four_corner_window_finds_a_trigger_split_over_the_corners_and_leaves_the_lattice_as_it_was():
    """``corners``: one more window, the four corner windows at once (``only`` keeps it alone). On
    a model that answers class 1 only when all four 2x2 corners are bright (CLB's trigger is in every corner), no
    single window moves an image and the four-corner window sends them all; the lattice's rows are those of the
    probe without it (same generator)."""
    from nft.searches import patch_probe

    u = PatchPerturbation((1, 12, 12), 0.25, 3, 0.2, "cpu", torch.Generator().manual_seed(3), corners=True)
    four = torch.zeros(1, 12, 12)
    four[:, :3, :3] = four[:, :3, -3:] = four[:, -3:, :3] = four[:, -3:, -3:] = 1
    assert u.window.shape == (10, 1, 12, 12) and torch.equal(u.window[9], four)
    assert torch.equal(u.window[9], u.window[[0, 2, 6, 8]].sum(0))
    one = PatchPerturbation((1, 12, 12), 0.25, 3, 0.2, "cpu", torch.Generator().manual_seed(3), only=9, corners=True)
    assert one.window.shape == (1, 1, 12, 12) and torch.equal(one.window[0], four)
    w = torch.zeros(2, 1, 16, 16)
    w[1, :, :2, :2] = w[1, :, :2, -2:] = w[1, :, -2:, :2] = w[1, :, -2:, -2:] = 0.6  # 1 corner 2.4, 3: 7.2, 4: 9.6
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    with torch.no_grad():
        net[1].weight.copy_(w.flatten(1))
        net[1].bias.copy_(torch.tensor([8.0, 0.0]))
    x, y = torch.rand(32, 1, 16, 16) * 0.1, torch.zeros(32, dtype=torch.long)
    out = patch_probe(net, x, y, 0.25, 2, 0.2, 10, 16, torch.Generator().manual_seed(0), corners=True)
    alone = patch_probe(net, x, y, 0.25, 2, 0.2, 10, 16, torch.Generator().manual_seed(0))
    assert out["windows"][:4] == alone["windows"] == [[0.0, 0]] * 4 and out["median"] == alone["median"]
    assert (out["window"], out["to"], out["share"]) == (4, 1, 1.0)
    assert validate(replace(recipe("default"), wide_corners=True, wide_window=9)).wide_window == 9
    with pytest.raises(NFTError, match="wide_window"):
        validate(replace(recipe("default"), wide_corners=False, wide_window=9))


def test_patch_probe_that_flags_nothing_changes_nothing_and_a_flag_makes_the_wide_search_a_patch(tiny, monkeypatch):
    """The tiny BadNets model (3 epochs on 2,400 images) sends the clean images to its target from every window
    (shares 0.78-0.89), so no window stands out and none is flagged: the masks are bit for bit those of a run
    without the probe. A flagged window sets the wide search to that window, its away loss to the probe's
    class, and patch_found's settings."""
    import nft.purify as P

    rt, data, attack, model, clean = tiny
    cfg = recipe("default", steps=6, batch_size=32, composites=0.0)
    a = purify(model, clean, cfg, rt)[3]
    b = purify(model, clean, replace(cfg, patch_probe=0.7, patch_probe_steps=5, patch_found={"wide": 0.5}), rt)[3]
    assert b["patch_probe"]["share"] >= 0.7 and b["patch_probe"]["median"] > 0.7  # high everywhere: no outlier
    assert b["patch_probe"]["flagged"] == [] and b["config"]["wide"] == 0
    assert all(torch.equal(a["mask_state"][k], b["mask_state"][k]) for k in a["mask_state"])
    seen = {}
    real = P.make_transform

    def spy(c, *args, **kw):
        seen["cfg"] = c
        return real(c, *args, **kw)

    monkeypatch.setattr(P, "make_transform", spy)
    monkeypatch.setattr(P, "patch_probe", lambda *args: {"windows": [[0.1, 3]] * 8 + [[1.0, 0]], "share": 1.0,
                                                        "to": 0, "window": 8, "median": 0.1})
    c = purify(model, clean, replace(cfg, patch_probe=0.9, patch_found={"wide": 0.5}), rt)[3]
    assert c["patch_probe"]["flagged"] == [8]
    assert (c["config"]["wide"], c["config"]["wide_norm"], c["config"]["wide_window"], c["config"]["wide_target"]) == (
        0.5, "patch", 8, 0)
    assert seen["cfg"].wide_window == 8


def test_universal_probe_finds_a_shortcut_to_one_class_and_not_on_a_model_without_one():
    from nft.searches import universal_probe

    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.rand(60, 1, 8, 8) * 0.2
    x[:, 0, 7, 7] = y / 2  # the honest feature: one pixel at 0, 0.5 or 1

    class Net(torch.nn.Module):
        """Reads the class from the bottom-right pixel (a step function: no gradient, robust to small
        deltas); with ``shortcut`` a bright top-left corner (a 'trigger') sends any image to class 2."""

        def __init__(self, shortcut):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))  # a parameter: the probe follows the model's device
            self.shortcut = shortcut

        def forward(self, im):
            honest = torch.nn.functional.one_hot((im[:, 0, 7, 7] * 2).round().long().clamp(0, 2), 3)
            out = honest * torch.tensor([2.0, 2.0, 30.0]) + self.w + 0 * im.sum((1, 2, 3))[:, None]  # zero gradient
            if self.shortcut:
                out = out + torch.nn.functional.one_hot(torch.tensor(2), 3) * 40 * (
                    im[:, 0, :3, :3].mean((1, 2)) - 0.25)[:, None]
            return out

    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    hit = universal_probe(Net(True), x, y, 0.15, 0.25, 30, 16, g())
    assert hit["to"] == 2 and hit["flip"] > 0.9  # the delta found the corner and sent the others to 2
    assert universal_probe(Net(False), x, y, 0.15, 0.25, 30, 16, g())["flip"] == 0  # nothing to find
    assert universal_probe(Net(True), x, y, 0.15, 0.25, 30, 16, g()) == hit  # seeded: the same answer


class Bomb(torch.nn.Module):
    """Wraps a model; its forward returns NaN from the ``at``-th call on."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls >= self.at else out


def test_clean_gap_is_zero_for_the_model_itself_and_large_for_a_broken_one(tiny):
    from nft.recovery import clean_gap

    rt, data, attack, model, clean = tiny
    same = clean_gap(model, copy.deepcopy(model), clean, 200, rt)
    assert same["gap"] == 0 and same == clean_gap(model, model, clean, 200, rt)  # its own generator: repeatable
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.parameters():
            p.mul_(0.0)  # reads every image as class 0 (a tenth of the copies; the tiny CNN reads ~22 %)
    gap = clean_gap(model, broken, clean, 200, rt)
    assert same["original"] > 15 and gap["purified"] == 10.0 and gap["gap"] == same["original"] - gap["purified"]


def _record_loss_steps(monkeypatch) -> list[int]:
    """Wrap nft.purify.make_loss so every loss call appends the global step it was given; returns that list."""
    import nft.purify as P

    steps, make_loss = [], P.make_loss
    monkeypatch.setattr(P, "make_loss", lambda *a: (lambda f: lambda m, x, y, s: steps.append(s) or f(m, x, y, s))(
        make_loss(*a)))
    return steps


def test_recovery_goes_on_only_while_the_clean_gap_is_above_recover_gap(tiny, monkeypatch):
    """A check the model passes changes nothing (bit for bit the run without the check); a failed one adds
    recover_steps more recovery steps, up to recover_rounds times, with the step-dependent settings seeing the
    global step (past adv_until: recovery, not the search); the round with the smallest gap is kept."""
    import nft.purify as P

    rt, data, attack, model, clean = tiny
    cfg = recipe("default", steps=20, batch_size=32, bn_recal=2, eval_every=10, oneshot={}, composites=0.0, patch_probe=0.0)
    off = purify(model, clean, cfg, rt)[3]
    passed = purify(model, clean, replace(cfg, recover_gap=100.0), rt)[3]
    assert "recovery_checks" not in off and len(passed["recovery_checks"]) == 1
    assert all(torch.equal(off["mask_state"][k], passed["mask_state"][k]) for k in off["mask_state"])
    gaps = iter([5.0, 4.0, 2.0, 3.0, 5.0, 4.0])
    monkeypatch.setattr(P, "clean_gap", lambda *a: {"gap": next(gaps)})
    seen, loss_steps = [], _record_loss_steps(monkeypatch)
    _, _, history, failed = purify(model, clean, replace(cfg, recover_gap=1.0, recover_steps=10, recover_rounds=2), rt,
                                   monitor=lambda m: seen.append(1) or {})
    steps = [h["step"] for h in history if "loss" in h]
    assert len(failed["recovery_checks"]) == 3 and steps[-1] == 40 and steps == sorted(steps)
    assert any(not torch.equal(off["mask_state"][k], failed["mask_state"][k]) for k in off["mask_state"])
    assert loss_steps == list(range(1, 41)) and len(seen) == 5  # the loss saw the global step; evaluated at 0, 10, ..., 40
    # the best-checked round is kept: here the first (gaps 3, 5, 4), so the masks are those of the run without the check
    undone = purify(model, clean, replace(cfg, recover_gap=1.0, recover_steps=10, recover_rounds=2), rt)[3]
    assert [c["gap"] for c in undone["recovery_checks"]] == [3.0, 5.0, 4.0]
    assert all(torch.equal(off["mask_state"][k], undone["mask_state"][k]) for k in off["mask_state"])


def test_per_weight_masks_from_a_flagged_pair_get_the_clean_check_but_no_extra_round(tiny, monkeypatch):
    """With a flagged composite pair the masks are per weight and fit the clean images' affine copies, so a failed
    check cannot be trusted to ask for more recovery (benchmarks/NOTES.md §31): the check is still run and recorded,
    and recovery stops there. Without a flagged pair the same failed check adds its rounds."""
    import nft.purify as P

    rt, data, attack, model, clean = tiny
    cfg = recipe("default", steps=20, batch_size=32, bn_recal=2, oneshot={}, patch_probe=0.0, recover_gap=1.0,
                 recover_steps=10)
    monkeypatch.setattr(P, "clean_gap", lambda *a: {"gap": 5.0})
    monkeypatch.setattr(P, "composite_probe", lambda *a: {"pairs": [], "top": (1, 2, 0, 0.2), "probed": 45})
    unflagged = purify(model, clean, cfg, rt)[3]
    assert len(unflagged["recovery_checks"]) == 3 and unflagged["config"]["recover_rounds"] == 2
    monkeypatch.setattr(P, "composite_probe", lambda *a: {"pairs": [(1, 2, 0, 1.0)], "top": (1, 2, 0, 1.0), "probed": 45})
    loss_steps = _record_loss_steps(monkeypatch)
    flagged = purify(model, clean, cfg, rt)[3]
    assert flagged["config"]["where"] == "weight" and flagged["config"]["recover_rounds"] == 0
    assert flagged["recovery_checks"] == [{"gap": 5.0}] and max(loss_steps) == 20


def test_nonfinite_loss_keeps_last_good_masks(tiny):
    rt, data, attack, model, clean = tiny
    cfg = recipe("paper", steps=30, batch_size=32, lr=0.5)
    purified, masks, history, extras = purify(Bomb(model, at=12), clean, cfg, rt)
    assert extras["stopped"] and "step 12" in extras["stopped"] and "kept the last good masks" in extras["stopped"]
    vals = torch.cat([v.flatten() for v in extras["mask_state"].values()])
    assert torch.isfinite(vals).all() and vals.min() < 1.0  # steps 1..11 did move the masks
    assert all(torch.isfinite(b).all() for b in purified.buffers())
    assert torch.isfinite(purified.inner(clean.x[:4])).all()


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": -1}, {"momentum": 1.5}, {"adv": 2}, {"where": "x"},
                                 {"schedule": "nope"}, {"batch_size": 0},
                                 {"mask_reset": 2, "bn_recal": 50}, {"mask_reset": 0.9, "bn_recal": 0},
                                 {"oneshot": {"steps": 0}}, {"oneshot": {"nope": 1}}, {"oneshot": {"oneshot_upto": 2}},
                                 {"oneshot": 3}, {"bn_recal": 0, "oneshot": {"mask_reset": 0.5}}, {"cutmix": 1.5}, {"cutmix": -0.1},
                                 {"adv_mode": "x"}, {"adv_mode": "image", "adv_frozen": True},
                                 {"adv_image_steps": 0}, {"neuron": 1.5}, {"neuron": 0.5, "neuron_steps": 0},
                                 {"neuron_eps": -0.1}, {"neuron_until": 2}, {"adv_starts": 0},
                                 {"adv_norm": "linf"}, {"optimizer": "rmsprop"}, {"adv_norm": "l1", "adv_mode": "image"},
                                 {"adv_loss": "kl"}, {"composites": 2}, {"composite_share": 0},
                                 {"composite_found": {"nope": 1}}, {"composite_found": {"where": "x"}},
                                 {"composite_found": {"oneshot": {}}}, {"composite_index": -1},
                                 {"wide": 1.5}, {"wide": 0.5, "adv_loss": "away"}, {"wide_eps": -1},
                                 {"wide_bn": "train"}, {"wide_norm": "linf"}, {"wide_grid": 0}, {"wide_window": 10},
                                 {"patch_probe": 1.5}, {"patch_found": {"patch_probe": 0.5}}, {"patch_found": {"where": "x"}},
                                 {"recover_gap": -1}, {"recover_gap": 1, "bn_recal": 0}, {"recover_steps": 0},
                                 {"recover_n": 0}, {"recover_rounds": -1}, {"rounds": 0},
                                 {"rounds": 2, "hold_below": 0.5}])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(NFTError, match="invalid NFT setting"):
        recipe("default", **bad)
