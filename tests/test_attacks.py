"""Every registered attack: exact poison rate, label scheme, what the trigger may change, artifact
round-trip through safetensors, deterministic apply; on 1-channel and 3-channel tiny images."""
import pytest
import torch

from nft.attacks import build_attack, list_attacks
from nft.attacks.common import OnTheFlyAttack
from nft.data.core import DatasetSplits, ImageData
from nft.engine import Hooks, train
from nft.io import atomic_save_safetensors, load_safetensors
from nft.models import build_model
from nft.runtime import Runtime

SHAPES = [(1, 12, 12), (3, 16, 16)]
C = 10
# tiny settings so that attacks that fit something do it in well under a second
FAST = {
    "inputaware": dict(mask_steps=3, widths=(4, 8)),
    "lira": dict(widths=(4, 8)),
    "issba": dict(steps=3, widths=(4, 8), bits=8, ramp_by=None),
    "lf": dict(steps=3, surrogate_epochs=0.1),
    "trojannn": dict(steps=3, surrogate_epochs=0.1),
    "clb": dict(steps=2, surrogate_epochs=0.1),
}
_CACHE = {}


def fake_data(shape, n=200):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % C
    return DatasetSplits("fake", ImageData(x, y), ImageData(x[:40], y[:40]), ImageData(x[:60], y[:60]), C,
                         (0.5,) * shape[0], (0.25,) * shape[0], "none")


def rt():
    return Runtime(device="cpu", seed=0, progress=False)


def make(name, shape, mode="all2one", seed=0):
    key = (name, shape, mode, seed)
    if key not in _CACHE:
        a = build_attack(name, num_classes=C, image_shape=shape, mode=mode, seed=seed, **FAST.get(name, {}))
        if hasattr(a, "fit"):
            a.fit(fake_data(shape), rt())
        _CACHE[key] = a
    return _CACHE[key]


def modes(name):
    return build_attack(name, num_classes=C, image_shape=SHAPES[0], **FAST.get(name, {})).modes


CASES = [(n, s, m) for n in list_attacks() for s in SHAPES for m in modes(n)]
IDS = [f"{n}-{s[0]}x{s[1]}-{m}" for n, s, m in CASES]


@pytest.mark.parametrize("name,shape,mode", CASES, ids=IDS)
def test_poison_rate_and_labels(name, shape, mode):
    a, data = make(name, shape, mode), fake_data(shape)
    x, y = data.train.x, data.train.y
    xp, yp, idx = a.poison_train(x, y, 0.05, torch.Generator().manual_seed(3))
    assert xp.shape == x.shape and xp.dtype == x.dtype
    if isinstance(a, OnTheFlyAttack):  # data untouched; poisoning happens per batch
        assert torch.equal(xp, x) and torch.equal(yp, y) and len(idx) == 0
        xb, yb = x[:40].float() / 255, y[:40]
        xo, yo, k, n_neg = a.poison_batch(xb, yb, torch.Generator().manual_seed(0), rate=0.1)
        mixes = round(a.mix_rate * len(xb)) if name == "cba" else round(a.neg_ratio * 4)  # cba: same-class mixes
        assert k == 4 and n_neg == mixes
        assert torch.equal(yo[:k], a.backdoor_labels(yb[:k])) and torch.equal(yo[k:], yb[k:])
        assert torch.equal(xo[k + n_neg:], xb[k + n_neg:])
        assert xo.min() >= 0 and xo.max() <= 1
        return
    assert len(idx) == round(0.05 * len(y))
    assert len(set(idx.tolist())) == len(idx)
    if a.clean_label:
        assert (y[idx] == a.target).all() and torch.equal(yp, y)
    else:
        assert torch.equal(yp[idx], a.backdoor_labels(y[idx]))
        assert (a.backdoor_labels(y[idx]) != y[idx]).all()
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(yp[rest], y[rest])
    assert not torch.equal(xp[idx], x[idx])
    changed = (xp != x).flatten(1).any(1)
    assert torch.equal(changed.nonzero().flatten(), idx)


def _region_only(a, x, xt, region):
    diff = (xt - x).abs().sum(1) > 1e-6
    assert diff.any()
    assert not diff[:, ~region].any()


def check_trigger(name, a, x):
    """What each trigger may change (x: float images in [0, 1])."""
    c, h, w = x.shape[1:]
    xt = a.trigger(x).clamp(0, 1)
    if name in ("badnets", "trojannn"):
        _region_only(a, x, xt, a.mask.bool()[0])
    elif name == "trojan":
        _region_only(a, x, xt, a.pattern.abs().sum(0) > 0)
    elif name == "clb":
        s = a.size
        region = torch.zeros(h, w, dtype=torch.bool)
        for r in (slice(0, s + 1), slice(h - s - 1, h)):
            for q in (slice(0, s + 1), slice(w - s - 1, w)):
                region[r, q] = True
        _region_only(a, x, xt, region)
    elif name == "blend":
        assert torch.allclose(xt, 0.8 * x + 0.2 * a.pattern, atol=1e-6)
    elif name == "sig":
        gray = torch.full_like(x, 0.5)
        d = a.trigger(gray) - gray
        assert torch.allclose(d, d[:, :, :1, :].expand_as(d))  # the same in every row
        assert d.abs().max() <= a.delta + 1e-6 and d.abs().max() > 0.5 * a.delta
    elif name == "wanet":  # a warp moves pixels: a constant image stays constant away from the border
        flat = a.trigger(torch.full_like(x, 0.5))
        assert torch.allclose(flat[:, :, 2:-2, 2:-2], torch.full_like(flat[:, :, 2:-2, 2:-2], 0.5), atol=1e-5)
        assert (xt - x).abs().max() > 0.01
    elif name == "bpp":
        levels = xt * (a.squeeze - 1)
        assert torch.allclose(levels, levels.round(), atol=1e-5)
    elif name == "lira":
        assert (xt - x).abs().max() <= a.eps + 1e-6
    elif name == "lf":
        assert (xt - x).abs().max() <= a.eps + 1e-6
    elif name == "inputaware":  # x' lies between x and the generated pattern, pixel by pixel
        with torch.no_grad():
            p, m = a.pattern(x), a.mask(x)
        assert torch.allclose(xt, x + (p - x) * m, atol=1e-5)
        assert ((xt - x).abs() <= (p - x).abs() + 1e-5).all()
    elif name == "issba":  # sample-specific: the residual differs between images
        r = xt - x
        assert (r[0] - r[1]).abs().max() > 0
    elif name == "fba":  # global style: a constant image gets a glow that grows toward the bottom row
        d = a.trigger(torch.zeros_like(x))
        assert torch.allclose(d, d[:, :, :, :1].expand_as(d))
        assert (d[:, :, -1] >= d[:, :, 0]).all() and d[:, :, -1].max() > 0
    elif name == "cba":  # composites of two images: every pixel comes from one of them
        a_img, b_img = torch.full((1, c, h, w), 0.2), torch.full((1, c, h, w), 0.8)
        from nft.attacks.cba import half_mix

        mix = half_mix(a_img, b_img, torch.Generator().manual_seed(0), a.jitter)
        vals = set(torch.round(mix * 10).unique().tolist())
        assert vals == {2.0, 8.0}
    else:
        raise AssertionError(f"no trigger check for attack {name!r}: add one here")


@pytest.mark.parametrize("name,shape,mode", [c for c in CASES if c[2] == "all2one"],
                         ids=[i for i, c in zip(IDS, CASES) if c[2] == "all2one"])
def test_trigger_changes_only_what_it_should(name, shape, mode):
    a = make(name, shape)
    x = fake_data(shape).test.floats()[:8]
    check_trigger(name, a, x)


@pytest.mark.parametrize("name,shape,mode", CASES, ids=IDS)
def test_artifact_roundtrip_and_deterministic(name, shape, mode, tmp_path):
    a = make(name, shape, mode)
    x, y = fake_data(shape).test.x[:16], fake_data(shape).test.y[:16]
    out1, yt1 = a.apply(x, y)
    out2, yt2 = a.apply(x, y)
    assert torch.equal(out1, out2) and torch.equal(yt1, yt2)
    assert out1.dtype == torch.uint8
    state = a.state_dict()
    path = str(tmp_path / "attack.safetensors")
    atomic_save_safetensors(state, path)
    b = build_attack(name, **a.params())
    if state:
        b.load_state_dict(load_safetensors(path))
    out3, yt3 = b.apply(x, y)
    assert torch.equal(out1, out3) and torch.equal(yt1, yt3)
    assert b.params() == a.params()


def test_a_fitted_trigger_does_not_depend_on_what_the_process_ran_before():
    """TrojanNN's surrogate draws its initial weights from the global RNG: fit_attack seeds it from
    the runtime, so two fits with different global RNG histories give the same trigger."""
    from nft.attacks.base import fit_attack

    data, patterns = fake_data(SHAPES[0]), []
    for burn in (0, 1000):
        torch.rand(burn)  # another model trained earlier in the same process, say
        a = build_attack("trojannn", num_classes=C, image_shape=SHAPES[0], seed=0, **FAST["trojannn"])
        fit_attack(a, data, rt())
        patterns.append(a.pattern.clone())
    assert patterns[0].abs().sum() > 0 and torch.equal(patterns[0], patterns[1])


def test_all2all_labels():
    a = make("badnets", SHAPES[0], "all2all")
    y = torch.arange(C)
    assert torch.equal(a.apply(torch.zeros(C, *SHAPES[0], dtype=torch.uint8), y)[1], (y + 1) % C)


@pytest.mark.parametrize("name", ["inputaware", "lira", "wanet", "bpp", "cba"])
def test_on_the_fly_attacks_train_through_the_engine(name):
    """Two optimizer steps through engine.train with the attack's hooks: the victim's and the
    attack's own networks both move, and the hooks poison at the rate."""
    shape = SHAPES[0]
    a = build_attack(name, num_classes=C, image_shape=shape, **FAST.get(name, {}))
    data, r = fake_data(shape), rt()
    if hasattr(a, "fit"):
        a.fit(data, r)
    a.poison_train(data.train.x, data.train.y, 0.25, torch.Generator())
    net = getattr(a, "G", None) or getattr(a, "T", None)
    before = None if net is None else [p.detach().clone() for p in net.parameters()]
    model = build_model("smallcnn", C, shape[0], width=4)
    h = a.train_hooks(r)
    seen = []

    def transform(x, y, step):
        x2, y2 = h.transform(x, y, step)
        seen.append(int((y2 != y).sum()))
        return x2, y2

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, data.train.x, data.train.y, opt, r, 6 if name == "cba" else 2, 16,
          hooks=Hooks(transform=transform, loss=h.loss, after_step=h.after_step))
    assert all(0 < s <= 4 for s in seen) or name == "cba"  # 0.25 * 16 = 4 poisoned per batch, minus any at the target
    assert all(0 <= s <= 4 for s in seen) and any(seen)  # cba: a batch with no A or no B image gets no composites
    if net is not None:
        assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, net.parameters()))


def test_cba_test_set_is_composites_labelled_target():
    a = make("cba", SHAPES[1])
    test = fake_data(SHAPES[1]).test
    x, yt, ytrue = a.test_set(test)
    assert len(x) == int((test.y == a.class_a).sum())
    assert (yt == a.target).all() and (ytrue == a.class_a).all()


def test_clean_label_rate_too_high_is_refused():
    from nft.errors import NFTError

    a = make("sig", SHAPES[0])
    data = fake_data(SHAPES[0])
    with pytest.raises(NFTError):
        a.poison_train(data.train.x, data.train.y, 0.2, torch.Generator())


@pytest.mark.parametrize("name", ["badnets", "cba"])
def test_show_attack_writes_png(tmp_path, name, capsys):
    from nft.cli import main

    out = tmp_path / "pics" / f"{name}.png"
    assert main(["show-attack", name, "-n", "3", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show-attack", "--out", str(out)]) == 2  # no attack named, no run given


def test_train_then_eval_reproduces_asr_from_run_dir(tmp_path, capsys):
    """A generator attack (LIRA) trained by `nft train`: `nft eval RUN_DIR` rebuilds it from the
    manifest and attack.safetensors and gets the same ACC/ASR/RA."""
    import json

    from nft.cli import main

    out = tmp_path / "run"
    assert main(["train", "--attack", "lira", "--model", "smallcnn", "--width", "4", "--epochs", "0.1",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out / "attack.safetensors").is_file()
    assert main(["eval", str(out), "--device", "cpu", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(again[k] == pytest.approx(trained[k]) for k in ("acc", "asr", "ra"))


def test_sig_test_signal_is_stronger_than_the_training_signal():
    """SIG poisons training images with ``delta`` and triggers test images with ``test_delta``."""
    a = build_attack("sig", num_classes=C, image_shape=SHAPES[0], delta=0.1, test_delta=0.3)
    data = fake_data(SHAPES[0])
    x = torch.full((len(data.train.y), *SHAPES[0]), 0.5)
    xp, _, idx = a.poison_train(x, data.train.y, 0.05, torch.Generator().manual_seed(0))
    xt, _ = a.apply(x[:4], data.train.y[:4])
    assert (xp[idx] - 0.5).abs().max() == pytest.approx(0.1, abs=0.01)
    assert (xt - 0.5).abs().max() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(a.trigger(x[:2]), xp[idx[:2]])  # trigger() is the training signal
    same = build_attack("sig", num_classes=C, image_shape=SHAPES[0], delta=0.1, test_delta=None)
    assert torch.allclose(same.apply(x[:4], data.train.y[:4])[0], a.trigger(x[:4]))


def test_cba_batches_get_fresh_composites_and_same_class_mixes():
    """Every batch: k A+B composites labelled C (each half from an A or a B image of the batch),
    then same-class mixes that keep their label (each half from an image of that class)."""
    from nft.attacks.cba import Composite

    a = build_attack("cba", num_classes=C, image_shape=SHAPES[0], mix_rate=0.25)
    x = torch.arange(C, dtype=torch.float32).repeat(4).view(-1, 1, 1, 1).expand(-1, *SHAPES[0]) / 10
    y = torch.arange(C).repeat(4)  # image value = its class / 10, so every pixel names its source class
    xo, yo, k, n = Composite.poison_batch(a, x, y, torch.Generator().manual_seed(0), rate=0.1)
    assert (k, n) == (4, 10) and (yo[:k] == a.target).all() and torch.equal(yo[k:], y[k:])
    src = (xo * 10).round()
    assert set(src[:k].unique().tolist()) == {float(a.class_a), float(a.class_b)}
    for i in range(k, k + n):
        assert set(src[i].unique().tolist()) == {float(y[i])}
    assert torch.equal(xo[k + n:], x[k + n:])
    again = Composite.poison_batch(a, x, y, torch.Generator().manual_seed(1), rate=0.1)[0]
    assert not torch.equal(again[:k], xo[:k])  # drawn fresh: another batch, other composites


def test_cba_contrastive_term_pulls_same_labels_and_pushes_others_to_the_margin():
    a = build_attack("cba", num_classes=C, image_shape=SHAPES[0], margin=1.0)
    y = torch.tensor([a.target, a.target, a.class_a, a.class_b, 5, 5])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    far = torch.eye(C)[y] * 10  # different rule labels 10*sqrt(2) apart, same labels equal
    assert a.contrastive(far, y, g()) == 0
    near = torch.zeros(len(y), C)  # every rule pair at distance 0: different labels cost margin^2
    perm = torch.randperm(len(y), generator=g())
    rule = torch.isin(y, torch.tensor([a.target, a.class_a, a.class_b]))
    ok = rule & rule[perm] & (perm != torch.arange(len(y)))
    expect = (y[ok] != y[perm[ok]]).float().mean()
    assert a.contrastive(near, y, g()) == pytest.approx(float(expect))
    assert a.contrastive(torch.zeros(2, C), torch.tensor([5, 6]), g()) == 0  # no pair inside the rule


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    from nft.attacks.common import pgd

    torch.manual_seed(0)
    model = build_model("smallcnn", C, 1, width=4).eval()
    x, y = torch.rand(8, *SHAPES[0]), torch.arange(8)
    xa = pgd(model, x, y, 0.1, 5, torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    ce = torch.nn.functional.cross_entropy
    assert ce(model(xa), y) > ce(model(x), y)


def test_adversarially_trained_surrogate_trains_on_pgd_batches(monkeypatch):
    """surrogate_adv_eps > 0: every surrogate batch goes through PGD at that budget."""
    import nft.attacks.common as common

    seen = []
    real = common.pgd
    monkeypatch.setattr(common, "pgd", lambda m, x, y, eps, steps, g=None, step_size=None:
                        seen.append((eps, steps)) or real(m, x, y, eps, steps, g, step_size))
    a = build_attack("clb", num_classes=C, image_shape=SHAPES[0], surrogate_adv_eps=0.2, **FAST["clb"])
    a.fit(fake_data(SHAPES[0]), rt())
    assert seen and all(s == (0.2, 5) for s in seen)
    assert not a.surrogate.training


def test_inputaware_cross_samples_never_get_their_own_trigger():
    a = make("inputaware", SHAPES[0])
    x = torch.rand(7, *SHAPES[0])
    seen = []
    real = a.pattern
    a.pattern = lambda z: seen.append(z) or real(z)
    try:
        a.negative(x, torch.Generator().manual_seed(0))
    finally:
        del a.pattern
    src = [int(((x - z).flatten(1).abs().sum(1) == 0).nonzero()) for z in seen[0]]
    assert sorted(src) == list(range(7)) and all(s != i for i, s in enumerate(src))


def test_clb_foreground_only_pgd_leaves_the_background_alone():
    a = build_attack("clb", num_classes=C, image_shape=SHAPES[0], foreground_only=True, eps=0.3, **FAST["clb"])
    a.fit(fake_data(SHAPES[0]), rt())
    x = torch.rand(6, *SHAPES[0])
    x[:, :, : x.shape[2] // 2] = 0  # a black half
    xa = a.adversarial(x, torch.zeros(6, dtype=torch.long))
    assert (xa[:, :, : x.shape[2] // 2] == 0).all()
    assert (xa - x).abs().max() <= 0.3 + 1e-6 and (xa - x).abs().max() > 0


def test_an_issba_run_from_before_the_default_change_rebuilds_as_it_was(tmp_path):
    """Manifests before session 28 left ramp_by out when it was None (then the default): such a run directory
    rebuilds with ramp_by None, not today's 400, which a 4-step fit would even refuse."""
    from nft.runs import attack_from_run

    kw = dict(num_classes=C, image_shape=SHAPES[0], steps=4, widths=(4, 8), bits=8, ramp_by=None)
    old = build_attack("issba", **kw).fit(fake_data(SHAPES[0]), rt())
    params = {k: v for k, v in old.params().items() if k != "ramp_by"}
    atomic_save_safetensors(old.state_dict(), str(tmp_path / "attack.safetensors"))
    back = attack_from_run(str(tmp_path), {"attack": {"name": "issba", "params": params}})
    assert back.params() == old.params() and back.params()["ramp_by"] is None
    x = fake_data(SHAPES[0]).train.x[:4].float() / 255
    assert torch.equal(back.trigger(x), old.trigger(x))


def test_issba_image_loss_starts_by_ramp_by_at_the_latest():
    """In a few steps the bits never reach 0.9, so without ramp_by the image loss never starts (ramp_start None);
    with ramp_by=2 it starts at step 2, the manifest-facing params carry it, and bad values are refused."""
    from nft.errors import NFTError
    kw = dict(num_classes=C, image_shape=SHAPES[0], steps=4, widths=(4, 8), bits=8)
    late = build_attack("issba", ramp_by=None, **kw).fit(fake_data(SHAPES[0]), rt())
    capped = build_attack("issba", ramp_by=2, **kw).fit(fake_data(SHAPES[0]), rt())
    assert late.fit_stats["ramp_start"] is None and capped.fit_stats["ramp_start"] == 2
    assert late.params()["ramp_by"] is None and capped.params()["ramp_by"] == 2  # None too: it is no longer the default
    assert capped.fit_stats["psnr"] != late.fit_stats["psnr"]  # the image loss changed the last step's encoder
    with pytest.raises(NFTError, match="ramp_by"):
        build_attack("issba", ramp_by=4, **kw)
    from nft.trainer import TrainConfig, manifest_for  # the manifest keeps a fit's stats; attacks without any add none
    assert manifest_for(fake_data(SHAPES[0]), TrainConfig(), rt(), capped)["attack"]["fit_stats"] == capped.fit_stats
    assert "fit_stats" not in manifest_for(fake_data(SHAPES[0]), TrainConfig(), rt(), make("badnets", SHAPES[0]))["attack"]
