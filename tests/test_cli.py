"""The CLI on bad input: one line, exit 2, nothing written; kills leave no partial output; inputs are
never modified; the same seed gives the same metrics."""
import contextlib
import errno
import hashlib
import io as _io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nft.cli import main

ONE_LINE = re.compile(r"nft: error: [^\n]+\n")
FAST = ["--steps", "3", "--set", "batch_size=16", "--per-class", "2", "--no-progress", "--device", "cpu"]
FOREIGN = ["--arch", "smallcnn", "--num-classes", "10", "--normalize", "mnist", "--width", "4"]


def cli(*argv):
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def tree_digest(path) -> dict:
    """sha256 of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(files)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A backdoored smallcnn run directory (a few training steps), its weights as a foreign .pt, clean .npz files."""
    from nft.attacks import build_attack
    from nft.data import load_dataset
    from nft.models import build_model
    from nft.runtime import Runtime
    from nft.trainer import TrainConfig, manifest_for, save_run, train_model

    d = tmp_path_factory.mktemp("cli")
    torch.set_num_threads(2)
    rt = Runtime(device="cpu", seed=0, progress=False)
    data = load_dataset("mnist10k")
    attack = build_attack("badnets", num_classes=10, image_shape=data.input_shape, seed=0)
    cfg = TrainConfig(arch="smallcnn", arch_kwargs={"width": 4}, epochs=0.1, batch_size=64)
    model, info = train_model(data, cfg, rt, attack)
    save_run(str(d / "run"), model, manifest_for(data, cfg, rt, attack), attack)
    torch.save({"netC": model.net.state_dict()}, d / "net.pt")
    torch.save(build_model("plaincnn", 10, 1, width=4).net.state_dict(), d / "plain.pt")
    x, y = data.heldout.x[:60, 0].numpy(), data.heldout.y[:60].numpy()
    np.savez(d / "clean.npz", x=x, y=y)
    np.savez(d / "few.npz", x=x[:5], y=y[:5])
    np.savez(d / "nine.npz", x=x[y != 9], y=y[y != 9])
    np.savez(d / "rgb.npz", x=np.repeat(x[..., None], 3, -1), y=y)
    np.savez(d / "big.npz", x=np.zeros((60, 32, 32), np.uint8), y=y)
    np.savez(d / "labels.npz", x=x, y=y + 5)
    open(d / "trunc.pt", "wb").write(open(d / "net.pt", "rb").read()[:700])
    return d


def _errors(ws):
    run, net = ws / "run", ws / "net.pt"
    return {
        "missing file": (["purify", ws / "nope", "--out", "O"], "no such file"),
        "missing npz": (["purify", run, "--clean-npz", ws / "nope.npz", "--out", "O"], "no such file"),
        "truncated checkpoint": (["purify", ws / "trunc.pt", *FOREIGN, "--out", "O"], "corrupt or truncated"),
        "corrupt npz": (["purify", run, "--clean-npz", ws / "trunc.pt", "--out", "O"], "not a readable .npz"),
        "arch mismatch": (["purify", net, *FOREIGN[:-2], "--arch", "tinyvit", "--out", "O"], "missing keys"),
        "classes mismatch": (["purify", net, *FOREIGN, "--num-classes", "43", "--out", "O"], "try --num-classes 10"),
        "no manifest, no arch": (["purify", net, "--out", "O"], "--arch NAME"),
        "no maskable layer": (["purify", ws / "plain.pt", "--arch", "plaincnn", *FOREIGN[2:], "--set", "where=norm",
                               "--out", "O"], "no maskable layer"),
        "fewer images than classes": (["purify", run, "--clean-npz", ws / "few.npz", "--per-class", "1", "--out", "O"],
                                      "only 0 exist|no images|fewer than"),
        "class missing": (["purify", run, "--clean-npz", ws / "nine.npz", "--per-class", "1", "--out", "O"], "class 9"),
        "per-class too large": (["purify", run, "--per-class", "100000", "--out", "O"], "only"),
        "labels out of range": (["purify", run, "--clean-npz", ws / "labels.npz", "--out", "O"], "labels must be in 0..9"),
        "wrong image size": (["purify", run, "--clean-npz", ws / "big.npz", "--out", "O"], "wrong size"),
        "wrong channel count": (["purify", run, "--clean-npz", ws / "rgb.npz", "--out", "O"], "wrong channel count"),
        "unknown defense": (["purify", run, "--defense", "nfft", "--out", "O"], "did you mean 'nft'"),
        "unknown attack": (["train", "--attack", "badnet", "--out", "O"], "did you mean 'badnets'"),
        "unknown dataset": (["train", "--dataset", "mnist10", "--out", "O"], "did you mean 'mnist10k'"),
        "unknown model": (["train", "--model", "smalcnn", "--out", "O"], "did you mean 'smallcnn'"),
        "unknown setting": (["purify", run, "--set", "lrr=0.1", "--out", "O"], "did you mean 'lr'"),
        "bad setting": (["purify", run, "--set", "batch_size=0", "--out", "O"], "batch_size"),
        "bad normalize": (["purify", net, *FOREIGN[:4], "--normalize", "cifar", "--out", "O"], "did you mean 'cifar10'"),
        "out exists": (["purify", run, "--out", ws / "few.npz"], "exists; pass --overwrite"),
        "out is the input": (["purify", run, "--out", run, "--overwrite"], "overlaps the input"),
        "missing arguments": (["purify"], "required: model, --out"),
        "unknown flag": (["purify", run, "--out", "O", "--bogus"], "unrecognized arguments"),
        "bad integer": (["purify", run, "--out", "O", "--steps", "ten"], "invalid int value|expected an integer"),
        "bad choice": (["purify", run, "--out", "O", "--recipe", "best"], "invalid choice"),
        "steps twice": (["purify", run, "--out", "O", "--steps", "3", "--set", "steps=4"], "disagree"),
        "no command": ([], "required: command"),
        "unknown command": (["purfy"], "invalid choice"),
        "unusable device": (["eval", run, "--device", "cuda:99"], "not usable"),
    }


@pytest.mark.parametrize("case", list(_errors(__import__("pathlib").Path("."))))
def test_one_line_exit_2(ws, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    argv, expected = _errors(ws)[case]
    before = tree_digest(str(ws))
    rc, _, err = cli(*argv)
    assert rc == 2 and ONE_LINE.fullmatch(err), (case, rc, err)
    assert re.search(expected, err), (case, err)
    assert not os.path.exists(tmp_path / "O") and not os.listdir(tmp_path), "a failed command left output"
    assert tree_digest(str(ws)) == before, "an input was modified"


def test_existing_output_refused_and_overwrite(ws, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = cli("purify", ws / "run", "--out", out, *FAST)
    assert rc == 2 and "exists; pass --overwrite" in err
    rc, _, err = cli("purify", ws / "run", "--out", out, "--overwrite", *FAST)
    assert rc == 0, err
    want = {"history.json", "manifest.json", "masks.safetensors", "metrics.json", "model.safetensors"}
    if os.path.exists(ws / "run" / "attack.safetensors"):
        want.add("attack.safetensors")
    assert set(os.listdir(out)) == want
    assert os.listdir(tmp_path) == ["out"]


def test_foreign_checkpoint_purify_then_eval(ws, tmp_path):
    before = tree_digest(str(ws / "net.pt"))
    rc, _, err = cli("purify", ws / "net.pt", *FOREIGN, "--clean-npz", ws / "clean.npz", "--out", tmp_path / "p", *FAST)
    assert rc == 0, err
    m = json.load(open(tmp_path / "p" / "manifest.json"))
    assert m["source"]["reading"].startswith("as saved") and m["source"]["state_dict"] == "['netC']"
    rc, out, err = cli("eval", tmp_path / "p", "--dataset", "mnist10k", "--no-progress", "--device", "cpu")
    assert rc == 0 and "acc" in json.loads(out), err
    assert tree_digest(str(ws / "net.pt")) == before


def test_nan_loss_keeps_last_good_masks_and_says_so(ws, tmp_path):
    rc, _, err = cli("purify", ws / "run", "--out", tmp_path / "p", *FAST, "--set", "l1=1e300")
    assert rc == 2 and ONE_LINE.fullmatch(err) and "stopped early" in err and "last good masks" in err, err
    m = json.load(open(tmp_path / "p" / "manifest.json"))
    assert "loss became" in m["purified"]["stopped"]
    assert os.path.isfile(tmp_path / "p" / "masks.safetensors")


def test_full_disk(ws, tmp_path, monkeypatch):
    import nft.io

    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= 2:  # everything after the first file of the output hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(nft.io.os, "fsync", fsync)
    rc, _, err = cli("purify", ws / "run", "--out", tmp_path / "p", *FAST)
    assert rc == 2 and ONE_LINE.fullmatch(err) and "disk is full" in err, err
    assert os.listdir(tmp_path) == []


def test_same_seed_same_metrics(ws, tmp_path):
    """Once in this process, once in a fresh one with another hash seed: identical metrics, masks and weights."""
    argv = ["purify", ws / "run", "--eval", "--steps", "8", "--set", "batch_size=16", "--per-class", "3",
            "--seed", "7", "--no-progress", "--device", "cpu", "--threads", "2"]
    rc, _, err = cli(*argv, "--out", tmp_path / "p0")
    assert rc == 0, err
    env = dict(os.environ, PYTHONHASHSEED="123")
    r = subprocess.run([sys.executable, "-m", "nft", *map(str, argv), "--out", str(tmp_path / "p1")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = [(json.load(open(tmp_path / p / "metrics.json")), open(tmp_path / p / "masks.safetensors", "rb").read(),
             open(tmp_path / p / "model.safetensors", "rb").read()) for p in ("p0", "p1")]
    (m0, masks0, w0), (m1, masks1, w1) = runs
    assert {k: m0[k] for k in ("before", "after", "der")} == {k: m1[k] for k in ("before", "after", "der")}
    assert masks0 == masks1 and w0 == w1


# -- real processes ----------------------------------------------------------------------------------
def _nft(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "nft", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=kw.pop("stderr", subprocess.PIPE), text=True, **kw)


def test_real_process_errors_are_one_line(ws, tmp_path):
    for argv in (["purify", ws / "nope", "--out", tmp_path / "o"], ["purify", "--steps", "-1"]):
        p = _nft(*argv)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2 and ONE_LINE.fullmatch(err) and "Traceback" not in err, err


def _start_long_purify(ws, out, log):
    return _nft("purify", ws / "run", "--out", out, "--steps", "100000", "--set", "batch_size=16", "--set",
                "log_every=1", "--per-class", "2", "--device", "cpu", "--threads", "1",
                stderr=open(log, "w"))


def _wait_for_progress(p, log, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if re.search(r"nft:\s+0%.*\| *[1-9]\d*/", open(log).read()):
            return
        assert p.poll() is None, open(log).read()
        time.sleep(0.2)
    pytest.fail("purification did not start")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_purification_leaves_nothing(ws, tmp_path, sig):
    before = tree_digest(str(ws))
    parent = tmp_path / "outputs"
    out = parent / "purified"
    p = _start_long_purify(ws, out, tmp_path / "log")
    try:
        _wait_for_progress(p, tmp_path / "log")  # midway: some steps done, the rest to come
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode == (-9 if sig == signal.SIGKILL else 143)
    assert not out.exists(), "the output directory must not exist after a kill"
    if parent.exists():  # at most a hidden temporary directory, which the next run removes
        assert all(n.startswith(".purified.tmp-") for n in os.listdir(parent))
    assert tree_digest(str(ws)) == before, "the input must be byte-identical"
    if sig == signal.SIGTERM:
        assert "terminated" in open(tmp_path / "log").read()


def test_killed_while_writing_leaves_no_partial_file(ws, tmp_path):
    """SIGKILL between two files of the output: the half-built directory is a hidden temp that the
    next run removes; the output path itself never exists half-written."""
    out = tmp_path / "purified"
    code = ("import sys, time, nft.commands.purify as P\n"
            "real = P.save_model\n"
            "def slow(model, d, manifest):\n"
            "    print('WRITING', flush=True); time.sleep(600)\n"
            "P.save_model = slow\n"
            "from nft.cli import main\n"
            f"sys.exit(main({[str(a) for a in ['purify', ws / 'run', '--out', out, *FAST]]!r}))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "WRITING", p.stderr.read()
        p.kill()
        p.wait(timeout=60)
    finally:
        p.kill()
    assert not out.exists()
    leftovers = os.listdir(tmp_path)
    assert leftovers and all(n.startswith(".purified.tmp-") for n in leftovers)  # masks/history already in it
    rc, _, err = cli("purify", ws / "run", "--out", out, *FAST)
    assert rc == 0, err
    assert os.listdir(tmp_path) == ["purified"], "the next run removes what the killed one left"
