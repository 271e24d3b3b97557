"""Baseline defenses: each reads only its clean set, ignores the runner's monitor, leaves the input
model alone, and shows its defining behaviour on a tiny model (seconds each, CPU)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from nft.data import CleanSet
from nft.defenses import get_defense
from nft.defenses.common import epoch_steps, prune_neurons
from nft.engine import Hooks, predict, train
from nft.errors import NFTError
from nft.models import build_model, last_linear
from nft.registry import ATTACKS, DATASETS, DEFENSES
from nft.runtime import Runtime

C, SIZE = 4, 8
# tiny settings per defense: a few optimizer steps each (defaults are the papers'; see each config)
FAST = {
    "ft": {"steps": 2, "batch_size": 16},
    "fp": {"steps": 2, "batch_size": 16},
    "nad": {"steps": 2, "batch_size": 16},
    "anp": {"steps": 3, "batch_size": 16},
    "ibau": {"n_rounds": 1, "batch_size": 20, "K": 2},
    "rnp": {"unlearn_epochs": 2, "recover_epochs": 1, "batch_size": 16},
    "ftsam": {"steps": 2, "batch_size": 16},
    "awm": {"outer": 1, "inner_mult": 1, "batch_size": 20},
    "clp": {},
    "fst": {"steps": 2, "batch_size": 16},
    "nft": {"steps": 3, "batch_size": 16},
}
DATA_FREE = {"clp"}


def quadrant_data(per_class=10, seed=0):
    """Class k = a bright quadrant k on dim noise: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(per_class)
    x = torch.rand(len(y), 1, SIZE, SIZE, generator=g) * 0.3
    h = SIZE // 2
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 0.7
    return x.clamp(0, 1), y


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("smallcnn", C, 1, width=4)


@pytest.fixture(scope="module")
def trained():
    """A smallcnn that classifies the quadrant data (clean accuracy ~1), and its clean set."""
    rt = Runtime(device="cpu", seed=0, progress=False)
    model = tiny_model()
    x, y = quadrant_data(40, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, x, y, opt, rt, 80, 32, hooks=Hooks(), replacement=True)
    model.eval()
    xc, yc = quadrant_data(10, seed=2)
    clean = CleanSet(xc, yc, C, "none")
    assert (predict(model, xc, rt) == yc).float().mean() > 0.9
    return model, clean


class Recorded(torch.Tensor):
    """A tensor that logs every torch operation on it (results are plain tensors)."""

    log: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.log.append(getattr(func, "__name__", str(func)))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class Sentinel(Recorded):
    """The runner's evaluation and poisoned data: a defense must never touch it."""

    log: list = []


def tripwire(kind, key, tripped):
    def f(*a, **k):
        tripped.append(f"{kind}:{key}")
        raise RuntimeError(f"a defense asked for the {kind} {key!r}")
    return f


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def names():
    return DEFENSES.names()


@pytest.mark.parametrize("name", names())
def test_defense_reads_only_the_clean_set_it_is_given(name, rt, monkeypatch):
    """Every dataset and attack builder is a tripwire and the clean tensors log their reads: a
    defense that loaded data of its own, or the trigger, fails; one that ignored its clean set too."""
    tripped = []
    for reg in (DATASETS, ATTACKS):
        for key in list(reg._items):
            monkeypatch.setitem(reg._items, key, tripwire(reg.kind, key, tripped))
    x, y = quadrant_data(5)
    clean = CleanSet(x.as_subclass(Recorded), y.as_subclass(Recorded), C, "shift")
    model = tiny_model()
    before = state(model)
    Recorded.log.clear()
    result = get_defense(name)(model, clean, dict(FAST.get(name, {})), rt, monitor=None)
    assert not tripped
    if name in DATA_FREE:
        assert Recorded.log == [], f"{name} is data-free but read the clean set"
    else:
        assert Recorded.log, f"{name} never read its clean set"
    assert same_state(state(model), before), "the input model must not be modified"
    assert result.model is not model
    assert not any(parametrize.is_parametrized(m) for m in result.model.modules()), "masks must be folded"
    assert result.model(torch.rand(2, 1, SIZE, SIZE)).shape == (2, C)


@pytest.mark.parametrize("name", names())
def test_monitor_results_never_steer_the_defense(name):
    """The runner's monitor reads the evaluation/poisoned sets (sentinels). Two monitors that report
    opposite numbers, and no monitor at all, must give the same purified model bit for bit."""
    x, y = quadrant_data(5)
    test_x = torch.rand(8, 1, SIZE, SIZE).as_subclass(Sentinel)
    models = []
    for report in (None, {"acc": 0.0, "asr": 100.0, "ra": 0.0}, {"acc": 100.0, "asr": 0.0, "ra": 100.0}):
        def monitor(m, report=report):
            was = m.training
            m.eval()
            with torch.no_grad():
                m(test_x)
            m.train(was)
            return dict(report)

        Sentinel.log.clear()
        rt = Runtime(device="cpu", seed=3, progress=False)
        out = get_defense(name)(tiny_model(), CleanSet(x, y, C, "shift"), dict(FAST.get(name, {})), rt,
                                monitor=None if report is None else monitor)
        models.append(state(out.model))
    assert same_state(models[0], models[1]) and same_state(models[0], models[2])


@pytest.mark.parametrize("name", [n for n in names() if n != "nft"])
def test_unknown_setting_is_rejected(name, rt):
    x, y = quadrant_data(2)
    with pytest.raises(NFTError):
        get_defense(name)(tiny_model(), CleanSet(x, y, C), {"no_such_setting": 1}, rt)


def test_step_rule():
    assert epoch_steps(2500, 100, 256) == (977, 256)  # BackdoorBench's FT, step for step
    assert epoch_steps(500, 100, 256) == (196, 256)
    assert epoch_steps(10, 100, 256) == (100, 10)  # one image per class: 100 steps of 10
    assert epoch_steps(500, 512, 128) == (2000, 128)  # ANP's official 2,000 iterations
    assert epoch_steps(500, 100, 256, steps=7) == (7, 256)


# -- defining behaviour of each defense -------------------------------------------------------------

def test_ft_lowers_the_clean_loss(rt):
    model = tiny_model()
    x, y = quadrant_data(10)
    clean = CleanSet(x, y, C, "none")
    ce = lambda m: float(nn.functional.cross_entropy(m.eval()(x), y))  # noqa: E731
    out = get_defense("ft")(model, clean, {"steps": 30, "batch_size": 20, "lr": 0.05}, rt).model
    assert ce(out) < ce(model)


def test_fp_zeroes_the_least_active_head_inputs(trained, rt):
    model, clean = trained
    out = get_defense("fp")(model, clean, {"steps": 3, "batch_size": 16, "acc_ratio": 0.5}, rt)
    ex = out.extras
    assert ex["pruned"] > 0 and len(ex["pruned_index"]) == ex["pruned"]
    w = last_linear(out.model).weight
    assert torch.all(w[:, ex["pruned_index"]] == 0), "pruned columns must stay zero through fine-tuning"
    assert torch.count_nonzero(w.abs().sum(0)) == w.shape[1] - ex["pruned"]
    # the rule stopped before the held-out accuracy fell by acc_ratio
    kept = [t for t in ex["prune_trace"] if t["pruned"] == ex["pruned"]]
    assert not kept or ex["val_acc_unpruned"] - kept[0]["val_acc"] < 0.5 * ex["val_acc_unpruned"]
    assert ex["val_images"] < len(clean)  # a held-out part of the clean set, not test data


def test_nad_attends_to_the_last_three_resolutions(trained, rt):
    from nft.defenses.nad import attention, attention_layers

    assert attention_layers(build_model("preactresnet18", 10, 1, width=4), torch.rand(2, 1, 16, 16)) == [
        "net.layer2", "net.layer3", "net.layer4"]
    a = attention(torch.randn(3, 5, 4, 4), 2.0)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    model, clean = trained
    out = get_defense("nad")(model, clean, {"steps": 3, "batch_size": 16}, rt)
    assert out.extras["attention_layers"] == ["net.body.1", "net.body.4", "net.body.7"]
    assert {h["phase"] for h in out.history} == {"teacher", "student"}


def test_anp_noise_stays_within_eps_and_low_masks_are_pruned(trained, rt):
    model, clean = trained
    eps = 0.3
    out = get_defense("anp")(model, clean, {"steps": 6, "batch_size": 16, "eps": eps, "lr": 0.5,
                                            "threshold": 0.9}, rt)
    ex = out.extras
    assert 0 < ex["noise_abs_max"] <= eps + 1e-6, "the neuron perturbation must stay in [-eps, eps]"
    mods = dict(out.model.named_modules())
    orig = dict(model.named_modules())
    for name, m in ex["mask_state"].items():
        assert m.min() >= 0 and m.max() <= 1
        w = mods[name].weight
        assert torch.all(w[m <= 0.9] == 0) and torch.equal(w[m > 0.9], orig[name].weight[m > 0.9])
    assert ex["pruned"] == sum(int((m <= 0.9).sum()) for m in ex["mask_state"].values())


def test_ibau_inner_perturbation_raises_the_loss(trained, rt):
    model, clean = trained
    # the trained model is very confident (CE ~ 3e-4), so the official lr 10 barely moves delta here
    out = get_defense("ibau")(model, clean, {"n_rounds": 2, "batch_size": 20, "K": 2, "inner_lr": 1e4}, rt)
    for r in out.extras["rounds"]:
        assert r["ce_with_delta"] > 2 * r["ce_clean"]
        assert r["delta_l2"] <= out.extras["radius"] + 1e-5


def test_ibau_hypergradient_has_an_implicit_term(trained):
    from nft.defenses.ibau import IBAUConfig, hypergradient

    model = tiny_model().train()  # untrained: a confident model has almost no gradient w.r.t. delta
    x, y = trained[1].x[:16], trained[1].y[:16]
    params = list(model.parameters())
    delta = torch.full((1, 1, SIZE, SIZE), 0.3)
    g = torch.Generator().manual_seed(0)
    _, with_k = hypergradient(model, params, delta, x, y, IBAUConfig(K=3), torch.Generator().manual_seed(0))
    _, without = hypergradient(model, params, delta, x, y, IBAUConfig(K=0), g)
    assert any(not torch.allclose(a, b) for a, b in zip(with_k, without))


def test_rnp_unlearning_lowers_clean_accuracy_before_recovery(trained, rt):
    model, clean = trained
    out = get_defense("rnp")(model, clean, {"batch_size": 16, "unlearn_lr": 0.2, "recover_epochs": 5,
                                            "clean_threshold": 0.3}, rt)
    ex = out.extras
    assert ex["clean_acc_before"] > 0.9
    assert ex["unlearn_train_acc"][0] > 0.9 and ex["unlearn_train_acc"][-1] <= 0.3  # stops at the threshold
    assert ex["clean_acc_unlearned"] < ex["clean_acc_before"] - 0.5
    assert ex["clean_acc_recovered"] > ex["clean_acc_unlearned"]
    # only neurons with mask <= threshold are pruned, lowest masks first, and the clean accuracy cap holds
    mods = dict(out.model.named_modules())
    orig = dict(model.named_modules())
    zeroed = {(n, i) for n in ex["mask_state"] for i in range(mods[n].weight.numel())
              if mods[n].weight.view(-1)[i] == 0 and orig[n].weight.view(-1)[i] != 0}
    assert len(zeroed) == ex["pruned"]
    values = [float(ex["mask_state"][n].view(-1)[i]) for n, i in zeroed]
    assert all(v <= 0.2 for v in values)
    kept = [float(m.view(-1)[i]) for n, m in ex["mask_state"].items() for i in range(m.numel()) if (n, i) not in zeroed]
    assert not values or max(values) <= min(kept)
    assert ex["clean_acc_pruned"] >= ex["clean_acc_floor"] == pytest.approx(0.9 * ex["clean_acc_before"])


def quadrant_clean(per_class, seed):
    x, y = quadrant_data(per_class, seed)
    return CleanSet(x, y, C, "none")


def test_rnp_pruning_keeps_clean_accuracy_at_or_above_the_cap(trained, rt):
    """Random masks that would prune most of the model: the selection stops where clean accuracy
    would fall below acc_ratio x the accuracy before pruning, and picks the largest such count."""
    from nft.defenses.common import clean_accuracy
    from nft.defenses.rnp import RNPConfig, first_k, neuron_order, select_pruning

    model, clean = trained
    g = torch.Generator().manual_seed(0)
    state = {n: torch.rand(m.weight.shape, generator=g) for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    n = sum(m.numel() for m in state.values())
    before = clean_accuracy(model, clean, rt)
    for ratio in (0.9, 0.99):
        cfg = RNPConfig(threshold=1.0, acc_ratio=ratio, prune_step=1 / n)
        k, sweep, order, below = select_pruning(model, state, clean, cfg, rt, before)
        assert below == n and [s["pruned"] for s in sweep] == list(range(n + 1))
        assert 0 <= k < n  # pruning every neuron destroys the model, so the cap must bind
        pruned = copy.deepcopy(model)
        prune_neurons(pruned, first_k(state, order, k), 0.5)
        assert clean_accuracy(pruned, clean, rt) >= ratio * before
        assert all(s["clean_acc"] < ratio * before for s in sweep if s["pruned"] > k)  # the largest that passes
    # with no cap, the threshold rule alone decides (the old fixed-threshold behaviour)
    k, _, _, below = select_pruning(model, state, clean, RNPConfig(threshold=0.3, acc_ratio=0.0), rt, before)
    assert k == below == sum(int((m <= 0.3).sum()) for m in state.values())
    # and max_prune_ratio caps the count
    k, _, _, _ = select_pruning(model, state, clean, RNPConfig(threshold=1.0, acc_ratio=0.0, max_prune_ratio=0.25),
                                rt, before)
    assert k == int(0.25 * n)


def test_rnp_stops_unlearning_at_the_first_batch_below_the_threshold(trained, rt):
    """stop_check="batch" ends the ascent at the first step whose running epoch accuracy is
    <= clean_threshold; the official "epoch" check runs whole epochs on the same batches."""
    from nft.defenses.rnp import RNPConfig, unlearn

    model, _ = trained
    clean = quadrant_clean(20, seed=3)  # 80 images, batch 8: 10 steps per epoch
    per_epoch = 10
    runs = {}
    for check in ("batch", "epoch"):
        work = copy.deepcopy(model)
        cfg = RNPConfig(unlearn_lr=0.05, batch_size=8, clean_threshold=0.3, stop_check=check, min_stop_batches=2)
        _, trace, batch_acc = unlearn(work, clean, cfg, rt)
        runs[check] = (trace, batch_acc)
    trace, acc = runs["epoch"]
    assert len(acc) == per_epoch * len(trace) and trace[-1] <= 0.3
    trace_b, acc_b = runs["batch"]
    assert acc_b == acc[:len(acc_b)]  # the same ascent up to the stop
    epoch, done = divmod(len(acc_b) - 1, per_epoch)
    running = [sum(acc_b[epoch * per_epoch:epoch * per_epoch + j + 1]) / (j + 1) for j in range(done + 1)]
    assert running[-1] <= 0.3 and all(r > 0.3 for r in running[1:-1])  # first check after 2 batches
    assert len(acc_b) < len(acc)  # stopped inside an epoch the official check runs to its end
    assert trace_b[-1] == pytest.approx(running[-1])


def test_ftsam_steps_with_the_gradient_at_the_perturbed_weights(trained):
    import torch.nn.functional as F

    from nft.defenses.ftsam import FTSAMConfig, sam_loss

    model = copy.deepcopy(trained[0]).eval()
    x, y = trained[1].x[:16], trained[1].y[:16]
    cfg = FTSAMConfig(rho=0.05)
    before = state(model)
    loss = sam_loss(cfg)(model, x, y, 1)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert same_state(state(model), before), "the weights must be restored after the ascent"
    # by hand: e = rho * w^2 g / ||w g||, gradient of the smoothed CE at w + e
    params = list(model.parameters())
    g0 = torch.autograd.grad(F.cross_entropy(model(x), y, label_smoothing=0.1), params)
    norm = torch.norm(torch.stack([(p.abs() * g).norm() for p, g in zip(params, g0)]))
    with torch.no_grad():
        for p, g in zip(params, g0):
            p.add_(cfg.rho * p.pow(2) * g / norm)
    g1 = torch.autograd.grad(F.cross_entropy(model(x), y, label_smoothing=0.1), params)
    for a, b in zip(grads, g1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert float(loss) == pytest.approx(float(F.cross_entropy(copy.deepcopy(trained[0]).eval()(x), y,
                                                               label_smoothing=0.1)), rel=1e-5)


def test_awm_learns_elementwise_conv_masks_and_bounds_the_trigger(trained, rt):
    model, clean = trained
    out = get_defense("awm")(model, clean, {"outer": 2, "inner_mult": 2, "batch_size": 20, "gamma": 1e-3}, rt)
    ex = out.extras
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert ex["mask_entries"] == sum(m.weight.numel() for m in convs)
    assert ex["mask_mean"] < 1.0
    assert all(r["delta_l1"] <= ex["radius"] + 1e-4 for r in ex["rounds"])
    assert math.isclose(ex["radius"], 1000 * SIZE * SIZE / 3072)
    new = [m for m in out.model.modules() if isinstance(m, nn.Conv2d)]
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(convs, new))
    assert all(torch.all(b.weight.abs() <= a.weight.abs() + 1e-7) for a, b in zip(convs, new))  # m in [0, 1]


def test_clp_zeroes_the_high_uclc_channels(rt):
    torch.manual_seed(0)
    model = build_model("smallcnn", C, 1, width=8)  # >= 12 channels: with fewer, no value can pass mean + 3 std
    convs = [m for m in model.net.body if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.net.body if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.bias.fill_(0.1)
        convs[1].weight[3] *= 50  # one channel with a huge Lipschitz bound
    out = get_defense("clp")(model, None, {}, rt).model
    new_bns = [m for m in out.net.body if isinstance(m, nn.BatchNorm2d)]
    assert new_bns[1].weight[3] == 0 and new_bns[1].bias[3] == 0
    assert torch.count_nonzero(new_bns[1].weight) == len(new_bns[1].weight) - 1
    # the other layers' channels are untouched unless they are outliers themselves
    assert torch.equal(new_bns[0].weight, bns[0].weight) or (new_bns[0].weight == 0).sum() <= 1


def test_fst_reinitialises_the_head_and_keeps_its_norm(trained, rt):
    model, clean = trained
    out = get_defense("fst")(model, clean, {"steps": 5, "batch_size": 16}, rt).model
    a, b = last_linear(model).weight, last_linear(out).weight
    assert float(b.norm()) == pytest.approx(float(a.norm()), rel=1e-4)
    assert float((a * b).sum()) < float((a * a).sum()) * 0.5  # moved away from the backdoored head


def test_prune_neurons_handles_norm_and_channel_masks():
    model = build_model("plaincnn", C, 1, width=4)
    conv = model.net.body[0]
    mask = torch.ones(conv.weight.shape[0])
    mask[1] = 0.1
    pruned = prune_neurons(model, {"net.body.0": mask}, 0.2)
    assert pruned == {"net.body.0": 1} and torch.all(conv.weight[1] == 0) and torch.count_nonzero(conv.weight[0])


# -- the CLI: `nft purify RUN --defense NAME` for every registered defense ------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from nft.data import load_dataset
    from nft.trainer import TrainConfig, manifest_for, save_run

    d = tmp_path_factory.mktemp("defense-cli")
    data = load_dataset("mnist10k")
    cfg = TrainConfig(arch="smallcnn", arch_kwargs={"width": 4}, epochs=0.1, batch_size=64)
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1, width=4, mean=data.mean, std=data.std)
    save_run(str(d / "run"), model, manifest_for(data, cfg, Runtime(device="cpu", progress=False)))
    return d


@pytest.mark.parametrize("name", names())
def test_cli_purify_runs_every_defense(name, run_dir):
    import contextlib
    import io
    import json
    import os

    from nft.cli import main

    fast = dict(FAST.get(name, {}))
    sets = ["--steps", str(fast.pop("steps"))] if name == "nft" else []  # NFT's step count is its own flag
    sets += [a for k, v in fast.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    out = run_dir / f"out-{name}"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["purify", str(run_dir / "run"), "--defense", name, "--per-class", "3", "--no-progress",
                   "--device", "cpu", "--out", str(out), *sets])
    assert rc == 0
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["defense"] == name and metrics["seconds"] >= 0 and "peak_mb" in metrics
    assert {"model.safetensors", "manifest.json", "history.json"} <= set(os.listdir(out))
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["purified"]["defense"] == name
