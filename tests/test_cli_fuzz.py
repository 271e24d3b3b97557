"""Fuzzing the CLI with hypothesis: 220+ generated bad inputs (argument combinations, corrupted and
truncated checkpoints and manifests, clean images of every wrong shape and type).

For every input: no traceback reaches the user; the exit status is 0, or 2 with exactly one line
``nft: error: ...``; a failed command leaves no output directory (except a NaN stop, which saves the
last good masks on purpose); and the inputs are never modified. Calls go through ``nft.cli.main``
in-process for speed (tests/test_cli.py makes real subprocess calls); tiny models, few steps.
"""
import contextlib
import hashlib
import io as _io
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nft.cli import main

ONE_LINE = re.compile(r"nft: error: [^\n]+\n")
# NFT_FUZZ_SCALE=N runs N times as many examples, freshly random; by default the examples are fixed (derandomized)
SCALE = int(os.environ.get("NFT_FUZZ_SCALE", "1"))
FUZZ = dict(deadline=None, derandomize=SCALE == 1, database=None, suppress_health_check=list(HealthCheck))
FOREIGN = ["--arch", "smallcnn", "--num-classes", "10", "--normalize", "mnist", "--width", "4"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """An untrained smallcnn run directory (mnist10k, badnets), the same weights as a foreign .pt, clean .npz files."""
    from nft.attacks import build_attack
    from nft.data import load_dataset
    from nft.models import build_model
    from nft.runtime import Runtime
    from nft.trainer import TrainConfig, manifest_for, save_run

    d = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    data = load_dataset("mnist10k")
    attack = build_attack("badnets", num_classes=10, image_shape=data.input_shape, seed=0)
    cfg = TrainConfig(arch="smallcnn", arch_kwargs={"width": 4})
    model = build_model("smallcnn", 10, 1, data.mean, data.std, width=4)
    save_run(str(d / "run"), model, manifest_for(data, cfg, Runtime(device="cpu"), attack), attack)
    torch.save({"state_dict": model.net.state_dict(), "epoch": 1}, d / "net.pt")
    x, y = data.heldout.x[:40, 0].numpy(), data.heldout.y[:40].numpy()
    np.savez(d / "clean.npz", x=x, y=y)
    np.savez(d / "rgb.npz", x=np.repeat(x[..., None], 3, -1), y=y)
    np.savez(d / "floats.npz", x=x.astype(np.float32) / 255 * 2, y=y)
    open(d / "trunc.pt", "wb").write(open(d / "net.pt", "rb").read()[:500])
    (d / "empty_dir").mkdir()
    (d / "outputs").mkdir()
    return d


def digest(root) -> dict:
    return {os.path.join(p, f): hashlib.sha256(open(os.path.join(p, f), "rb").read()).hexdigest()
            for p, _, fs in os.walk(root) if "outputs" not in p and "scratch" not in p for f in fs}


def check(argv, outs=()):
    """Run one command in-process and check the contract. Returns (rc, stderr)."""
    existed = {o: os.path.exists(o) for o in outs}
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    err = err.getvalue()
    assert "Traceback" not in err and "Traceback" not in out.getvalue(), (argv, err)
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        assert ONE_LINE.fullmatch(err), (argv, err)
        if "stopped early" not in err:
            for o in outs:
                assert existed[o] or not os.path.exists(o), (argv, "a failed command left output", err)
    return rc, err


def fresh_out(ws) -> str:
    return tempfile.mkdtemp(dir=ws / "outputs") + "/out"


# -- 1. argument combinations --------------------------------------------------------------------------
def _fragments(ws):
    """Token groups the fuzzer adds to a command: valid and invalid values of every flag."""
    npz = [ws / "clean.npz", ws / "rgb.npz", ws / "floats.npz", ws / "trunc.pt", ws / "missing.npz", ws / "run"]
    vals = {
        "--arch": ["smallcnn", "plaincnn", "tinyvit", "smalcnn", "torchvision:nope", ""],
        "--num-classes": ["10", "2", "0", "-1", "ten", "99999999999"],
        "--normalize": ["mnist", "cifar10", "none", "0.5/0.25", "1,2/0", "x", ""],
        "--input-shape": ["1,28,28", "3,32,32", "1,28", "0,1,1", "a,b,c", "1,8,8", "1,1,1"],
        "--width": ["4", "0", "-3", "x", "5"],
        "--arch-kwargs": ['{"width": 4}', "[1]", "{", '{"nope": 1}', '{"width": "a"}', "null", '{"width": 0}'],
        "--per-class": ["1", "2", "0", "-2", "1000", "x"],
        "--fraction": ["0.05", "0", "2", "nan", "x"],
        "--clean-npz": npz,
        "--steps": ["1", "2", "0", "-1", "x", "1e3"],
        "--set": ["batch_size=8", "batch_size=0", "lr=-1", "lr=NaN", "where=bogus", "where=norm", "schedule=x",
                  "schedule=cosine", "augment=bogus", "augment=none", "l1=1e300", "noequals", "=3", "patch_size=[0.1]",
                  "patch_size=[0.1,0.2]", "mixup_alpha=0", "train_mode=1", "train_mode=false", "recipe=x",
                  "eval_every=0", "log_every=0", "steps=2", "adv=0.5", "momentum=true", "augment=null", "lr={}"],
        "--defense": ["nft", "nfft", ""],
        "--recipe": ["default", "paper", "bogus"],
        "--device": ["cpu", "cuda:7", "bogus"],
        "--threads": ["2", "0", "x"],
        "--seed": ["0", "-1", "99999999999999", "x", "3"],
        "--precision": ["fp32", "bf16", "fp64"],
        "--dataset": ["mnist10k", "mnst"],
        "--clean-seed": ["1", "-5"],
        "--out": [ws / "clean.npz", ws / "run", ws / "run" / "sub", ""],
    }
    frags = [[k, v] for k, vs in vals.items() for v in vs]
    frags += [["--overwrite"], ["--bogus"], ["--help"], ["extra-positional"], FOREIGN,
              ["--dataset", "cifar10", "--data-root", ws / "empty_dir"]]
    return frags


TRAIN_FRAGS = [["--attack", a] for a in ("badnets", "badnet", "")] + \
    [["--target", t] for t in ("0", "9", "10", "-1")] + [["--poison-rate", r] for r in ("0.1", "1.5", "-0.1", "x")] + \
    [["--label-mode", m] for m in ("all2all", "x")] + [["--dataset", s] for s in ("mnist10k", "x", "")] + \
    [["--epochs", e] for e in ("0", "-1", "x", "inf")] + [["--lr", v] for v in ("0", "nan")] + \
    [["--batch-size", b] for b in ("0", "x")] + [["--model", m] for m in ("tinyvit", "x", "plaincnn")] + \
    [["--width", w] for w in ("0", "2")] + [["--seed", "-3"], ["--overwrite"], ["--download", "--dataset", "x"]]


@settings(max_examples=110 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_arguments(ws, data):
    before = digest(ws)
    frags = _fragments(ws)
    command = data.draw(st.sampled_from(["purify"] * 5 + ["eval"] * 2 + ["train"] * 2 + ["bogus"]))
    out = fresh_out(ws)
    if command == "train":
        base = ["train", "--model", "smallcnn", "--width", "2", "--epochs", "0.01", "--batch-size", "32",
                "--out", out, "--no-progress", "--device", "cpu"]
        extra = data.draw(st.lists(st.sampled_from(TRAIN_FRAGS), max_size=3))
    else:
        model = data.draw(st.sampled_from([ws / "run", ws / "run", ws / "net.pt", ws / "missing", ws / "empty_dir",
                                           ws / "clean.npz", ws / "trunc.pt", ""]))
        base = [command, model, "--no-progress", "--device", "cpu"]
        if command == "purify":
            base += ["--out", out, "--steps", "2", "--set", "batch_size=8", "--per-class", "1"]
        drop = data.draw(st.sets(st.sampled_from(["model", "out", "per-class"]), max_size=2))
        if "model" in drop:
            base.remove(model)
        if "out" in drop and "--out" in base:
            i = base.index("--out")
            del base[i:i + 2]
        if "per-class" in drop and "--per-class" in base:
            i = base.index("--per-class")
            del base[i:i + 2]
        extra = data.draw(st.lists(st.sampled_from(frags), max_size=3))
        extra = [f for f in extra if not (command == "eval" and f[0] == "--dataset" and f[1] == "mnist10k")] + \
            ([["--dataset", "mnist10k"]] if command == "eval" and data.draw(st.booleans()) else [])
    argv = base + [t for f in extra for t in f]
    check(argv, outs=[out])
    assert digest(ws) == before, (argv, "an input was modified")


# -- 2. corrupted and truncated files ------------------------------------------------------------------
damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 0.999), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=256)),
)


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    kind, arg = how
    if kind == "truncate":
        data = data[: int(arg * len(data))]
    elif kind == "flip":
        for pos, bits in arg:
            data[int(pos * len(data))] ^= bits
    elif kind == "append":
        data += arg
    else:
        data = bytearray(arg)
    open(path, "wb").write(bytes(data))


@settings(max_examples=65 * SCALE, **FUZZ)
@given(target=st.sampled_from(["weights", "manifest", "manifest", "foreign", "npz"]), how=damage,
       command=st.sampled_from(["purify", "eval"]))
def test_fuzz_corrupt_files(ws, target, how, command):
    before = digest(ws)
    scratch = tempfile.mkdtemp(dir=ws / "outputs", prefix="scratch")
    run = shutil.copytree(ws / "run", os.path.join(scratch, "run"))
    foreign = shutil.copy(ws / "net.pt", os.path.join(scratch, "net.pt"))
    npz = shutil.copy(ws / "clean.npz", os.path.join(scratch, "clean.npz"))
    victim = {"weights": os.path.join(run, "model.safetensors"), "manifest": os.path.join(run, "manifest.json"),
              "foreign": foreign, "npz": npz}[target]
    _damage(victim, how)
    out = os.path.join(scratch, "out")
    if target == "foreign":
        argv = [command, foreign, *FOREIGN, "--dataset", "mnist10k"]
    else:
        argv = [command, run]
    if command == "purify":
        argv += ["--out", out, "--steps", "1", "--set", "batch_size=8", "--per-class", "1"]
        argv += ["--clean-npz", npz] if target in ("npz", "foreign") else []
    victim_bytes = open(victim, "rb").read()
    check(argv + ["--no-progress", "--device", "cpu"], outs=[out])
    assert open(victim, "rb").read() == victim_bytes, "a corrupted input was modified"
    assert digest(ws) == before
    shutil.rmtree(scratch)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=False) |
                           st.text(max_size=12), lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@settings(max_examples=40 * SCALE, **FUZZ)
@given(path=st.sampled_from([("arch",), ("arch_kwargs",), ("arch_kwargs", "width"), ("num_classes",), ("input_shape",),
                             ("mean",), ("std",), ("dataset",), ("dataset_kwargs",), ("augment",), ("weights",),
                             ("attack",), ("attack", "name"), ("attack", "params"), ("attack", "params", "target"),
                             ("attack", "params", "image_shape"), ("attack", "params", "num_classes"),
                             ("attack", "params", "mode"), ("sha256",)]),
       value=json_values, delete=st.booleans(), command=st.sampled_from(["purify", "eval"]))
def test_fuzz_manifest_values(ws, path, value, delete, command):
    """A hand-edited or hostile manifest: any field replaced by any JSON value, or removed."""
    scratch = tempfile.mkdtemp(dir=ws / "outputs", prefix="scratch")
    run = shutil.copytree(ws / "run", os.path.join(scratch, "run"))
    mpath = os.path.join(run, "manifest.json")
    m = json.load(open(mpath))
    node = m
    for k in path[:-1]:
        node = node.setdefault(k, {}) if isinstance(node.get(k), dict) else node.__setitem__(k, {}) or node[k]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    json.dump(m, open(mpath, "w"))
    out = os.path.join(scratch, "out")
    argv = [command, run, "--no-progress", "--device", "cpu"]
    if command == "purify":
        argv += ["--out", out, "--steps", "1", "--set", "batch_size=8", "--per-class", "1"]
    check(argv, outs=[out])
    shutil.rmtree(scratch)


# -- 3. clean images of every wrong shape and type --------------------------------------------------------
@settings(max_examples=50 * SCALE, **FUZZ)
@given(n=st.sampled_from([0, 1, 5, 10, 20]), layout=st.sampled_from(["NHW", "NHWC", "NCHW"]),
       c=st.sampled_from([1, 2, 3, 4]), hw=st.sampled_from([(28, 28), (32, 32), (28, 27), (1, 1), (3, 28)]),
       dtype=st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "float16", "complex64", "U1"]),
       labels=st.sampled_from(["ok", "ok", "shifted", "negative", "float", "fractional", "2d", "short", "nan", "str"]),
       scale=st.sampled_from([1.0, 255.0, math.nan, math.inf]), keys=st.sampled_from(["xy", "xy", "x", "ab"]))
def test_fuzz_clean_images(ws, n, layout, c, hw, dtype, labels, scale, keys):
    h, w = hw
    shape = {"NHW": (n, h, w), "NHWC": (n, h, w, c), "NCHW": (n, c, h, w)}[layout]
    rng = np.random.default_rng(n + c + h)
    x = rng.random(shape) * (scale if dtype not in ("uint8", "U1") else 1)
    x = x.astype(np.uint8 if dtype == "uint8" else dtype) if dtype != "U1" else x.astype(str).astype("U1")
    if dtype == "uint8":
        x = (rng.random(shape) * 255).astype(np.uint8)
    y = np.arange(n) % 10
    y = {"ok": y, "shifted": y + 3, "negative": y - 1, "float": y.astype(float), "fractional": y + 0.5,
         "2d": y.reshape(-1, 1), "short": y[:-1], "nan": np.full(n, np.nan), "str": y.astype(str)}[labels]
    scratch = tempfile.mkdtemp(dir=ws / "outputs", prefix="scratch")
    npz = os.path.join(scratch, "clean.npz")
    arrays = {"xy": {"x": x, "y": y}, "x": {"x": x}, "ab": {"a": x, "b": y}}[keys]
    np.savez(npz, **arrays)
    out = os.path.join(scratch, "out")
    check(["purify", ws / "run", "--clean-npz", npz, "--per-class", "1", "--steps", "1", "--set", "batch_size=4",
           "--out", out, "--no-progress", "--device", "cpu"], outs=[out])
    shutil.rmtree(scratch)
