"""Untrusted files never run code: a pickle that creates a file when unpickled is refused by every
loading path of the CLI and the API, and the file is never created."""
import contextlib
import io as _io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nft import io
from nft.checkpoints import load_checkpoint, read_tensors
from nft.cli import main
from nft.commands.common import load_clean_npz
from nft.errors import NFTError
from nft.models import build_model

FOREIGN = ["--arch", "smallcnn", "--num-classes", "10", "--normalize", "mnist", "--width", "4"]


class Payload:
    """Unpickling this runs exec(), which creates ``marker``: arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    marker = d / "PWNED"
    torch.manual_seed(0)
    net = build_model("smallcnn", 10, 1, (0.1307,), (0.3081,), width=4)
    sd = net.net.state_dict()
    files = {}

    def save(name, obj, **kw):
        torch.save(obj, d / name, **kw)
        files[name] = d / name

    save("zip.pt", {**sd, "extra": Payload(marker)})
    save("legacy.pth", {"state_dict": sd, "x": Payload(marker)}, _use_new_zipfile_serialization=False)
    save("nested.pt", {"netC": {"module.head.weight": sd["head.weight"], "hook": Payload(marker)}})
    for proto in (2, 4):
        with open(d / f"raw{proto}.pkl", "wb") as f:
            pickle.dump({"state_dict": Payload(marker)}, f, protocol=proto)
        files[f"raw{proto}.pkl"] = d / f"raw{proto}.pkl"
    shutil.copy(d / "zip.pt", d / "disguised.safetensors")  # a pickle with a safetensors name
    files["disguised.safetensors"] = d / "disguised.safetensors"
    # a run directory whose weights and attack artifact were swapped for the pickle
    run = d / "run"
    io.save_model(net, str(run), {"arch": "smallcnn", "arch_kwargs": {"width": 4}, "num_classes": 10,
                                  "input_shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081], "dataset": "mnist10k",
                                  "attack": {"name": "badnets", "params": {"num_classes": 10, "image_shape": [1, 28, 28]}}})
    clean_run = d / "clean_run"
    shutil.copytree(run, clean_run)
    shutil.copy(d / "zip.pt", run / "model.safetensors")
    m = json.loads((run / "manifest.json").read_text())
    m.pop("sha256")  # so that the loader reaches the weights instead of stopping at the hash
    (run / "manifest.json").write_text(json.dumps(m))
    shutil.copy(d / "zip.pt", clean_run / "attack.safetensors")
    # .npz files: an object array (needs pickle) and a raw pickle with an .npz name
    np.savez(d / "objects.npz", x=np.array([Payload(marker)], dtype=object), y=np.zeros(1))
    shutil.copy(d / "raw2.pkl", d / "disguised.npz")
    # positive control: the payload really does create the marker when a naive loader unpickles it
    torch.load(d / "zip.pt", weights_only=False)
    assert marker.exists(), "the payload must work, or this test proves nothing"
    marker.unlink()
    return d, marker, files, run, clean_run


def _cli(argv):
    err = _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def test_every_api_path_refuses(evil):
    d, marker, files, run, clean_run = evil
    for name, path in files.items():
        with pytest.raises(NFTError):
            read_tensors(str(path))
        with pytest.raises(NFTError):
            load_checkpoint(str(path), arch="smallcnn", num_classes=10, normalize="mnist", arch_kwargs={"width": 4})
        with pytest.raises(NFTError):
            io.load_model(str(path), arch="smallcnn", num_classes=10, normalize="mnist", arch_kwargs={"width": 4})
        with pytest.raises(NFTError):
            io.load_safetensors(str(path))
    for verify in (True, False):
        with pytest.raises(NFTError):
            io.load_model(str(run), verify=verify)
    from nft.runs import attack_from_run

    with pytest.raises(NFTError):
        attack_from_run(str(clean_run), json.loads((clean_run / "manifest.json").read_text()))
    for npz in ("objects.npz", "disguised.npz"):
        with pytest.raises(NFTError):
            load_clean_npz(str(d / npz))
    from nft.data import load_dataset

    with pytest.raises(Exception):  # the embedded dataset's loader, pointed at a hostile file
        load_dataset("mnist10k", root=str(d / "objects.npz"))
    from nft.masks import attach

    with pytest.raises(Exception):
        attach(build_model("smallcnn", 10, 1, width=4)).load(str(files["disguised.safetensors"]))
    assert not marker.exists()


def test_the_refusal_says_why_and_how_to_convert(evil):
    _, _, files, _, _ = evil
    with pytest.raises(NFTError) as e:
        read_tensors(str(files["zip.pt"]))
    msg = str(e.value)
    assert "refusing" in msg and "needs code to be unpickled" in msg and "(exec)" in msg
    assert "torch.save(model.state_dict()" in msg and "safetensors" in msg


def test_every_cli_path_refuses(evil, tmp_path):
    d, marker, files, run, clean_run = evil
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=np.zeros((20, 28, 28), np.uint8), y=np.arange(20) % 10)
    calls = []
    for name, path in files.items():
        calls += [["purify", path, *FOREIGN, "--clean-npz", clean, "--out", tmp_path / f"o-{name}"],
                  ["eval", path, *FOREIGN, "--dataset", "mnist10k"]]
    calls += [["purify", run, "--out", tmp_path / "o-run"], ["eval", run],
              ["eval", clean_run, "--device", "cpu"],
              ["purify", clean_run, "--clean-npz", d / "objects.npz", "--out", tmp_path / "o-npz"],
              ["purify", clean_run, "--clean-npz", d / "disguised.npz", "--out", tmp_path / "o-npz2"],
              ["train", "--dataset", "mnist10k", "--data-root", d / "objects.npz", "--model", "smallcnn",
               "--epochs", "0.01", "--out", tmp_path / "o-train"]]
    for argv in calls:
        rc, err = _cli(argv)
        assert rc == 2, (argv, err)
        assert re.fullmatch(r"nft: error: [^\n]+\n", err), (argv, err)
    assert not marker.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o-")], "a refused command wrote output"


def test_refusal_in_a_real_process(evil, tmp_path):
    _, marker, files, _, _ = evil
    r = subprocess.run([sys.executable, "-m", "nft", "purify", str(files["legacy.pth"]), *FOREIGN,
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "refusing to load" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


def _code_without_strings(path: Path) -> list[tuple[int, str]]:
    """The source lines of ``path`` with string literals and comments blanked out."""
    import tokenize

    lines: dict[int, str] = {}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.STRING, tokenize.COMMENT, tokenize.ENCODING):
                continue
            lines[tok.start[0]] = lines.get(tok.start[0], "") + " " + tok.string
    return sorted(lines.items())


def test_no_unsafe_loader_in_the_package():
    """Every torch.load is weights_only=True; nothing unpickles, evals or execs (strings don't count)."""
    root = Path(__file__).resolve().parents[1] / "nft"
    offenders = []
    for p in sorted(root.rglob("*.py")):
        for i, code in _code_without_strings(p):
            compact = code.replace(" ", "")
            if re.search(r"pickle\.loads?\(|allow_pickle=True|weights_only=False|(?<![\w.])(eval|exec)\(", compact):
                offenders.append(f"{p.name}:{i}")
            if "torch.load(" in compact and "weights_only=True" not in compact:
                offenders.append(f"{p.name}:{i}")
    assert not offenders, offenders
