"""Artifacts and checkpoints: foreign formats and their adapters, mismatch messages, corrupt files,
hostile manifests, atomic writes, staged output directories and a full disk."""
import errno
import json
import os
import subprocess

import pytest
import torch

from nft import io
from nft.checkpoints import find_state_dict, load_checkpoint, parse_normalize, read_tensors
from nft.errors import NFTError
from nft.models import build_model

SPEC = dict(arch="smallcnn", num_classes=10, normalize="mnist", arch_kwargs={"width": 4})


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_model("smallcnn", 10, 1, (0.1307,), (0.3081,), width=4)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "netC", "net", "module", "nested", "bookkeeping"])
def test_foreign_layouts_load(tmp_path, net, wrap):
    sd = net.net.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "num_classes": 10, "model_name": "smallcnn"},  # BackdoorBench attack_result.pt
        "netC": {"netC": sd, "epoch": 12},  # the NFT seed / Input-aware Dynamic checkpoints
        "net": {"net": sd, "acc": 93.1},  # I-BAU
        "module": {f"module.{k}": v for k, v in sd.items()},  # DataParallel
        "nested": {"state_dict": {"model": {f"module.{k}": v for k, v in sd.items()}}},
        "bookkeeping": {**sd, "epoch": 3},
    }[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    model, manifest = io.load_model(str(path), **SPEC)
    assert _same(model, net)
    assert manifest["source"]["sha256"] == io.sha256_file(str(path))
    assert manifest["input_shape"] == [1, 28, 28] and manifest["mean"] == [0.1307]


def test_own_classifier_keys_and_safetensors(tmp_path, net):
    """A whole Classifier state (normalize.* + net.*) carries its own normalization; safetensors files load too."""
    io.atomic_save_safetensors(net.state_dict(), str(tmp_path / "w.safetensors"))
    model, manifest = io.load_model(str(tmp_path / "w.safetensors"), arch="smallcnn", num_classes=10,
                                    input_shape="1,28,28", arch_kwargs={"width": 4})
    assert _same(model, net) and manifest["std"] == pytest.approx([0.3081])
    with pytest.raises(NFTError, match="differs from --normalize"):
        io.load_model(str(tmp_path / "w.safetensors"), **dict(SPEC, normalize="none", input_shape="1,28,28"))


def test_backdoorbench_preactresnet_names(tmp_path):
    """BackdoorBench's PreActResNet-18 parameter names are ours; its DataParallel prefix is stripped."""
    torch.manual_seed(0)
    bb = build_model("preactresnet18", 10, 3, width=4).net
    torch.save({"model": {"module." + k: v for k, v in bb.state_dict().items()}, "model_name": "preactresnet18"},
               tmp_path / "attack_result.pt")
    model, _ = io.load_model(str(tmp_path / "attack_result.pt"), arch="preactresnet18", num_classes=10,
                             normalize="cifar10", arch_kwargs={"width": 4})
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), bb.state_dict().values()))


def test_torchvision_names(tmp_path):
    import torchvision

    tv = torchvision.models.mobilenet_v3_small(num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model, m = io.load_model(str(tmp_path / "tv.pth"), arch="torchvision:mobilenet_v3_small", num_classes=10,
                             normalize="imagenet", input_shape="3,64,64")
    assert m["input_shape"] == [3, 64, 64]
    assert torch.equal(model.net.classifier[-1].weight, tv.classifier[-1].weight)


def test_mismatch_names_the_first_keys(tmp_path, net):
    torch.save(net.net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(NFTError, match=r"head.weight is \(10, 16\).*try --num-classes 10"):
        io.load_model(str(tmp_path / "w.pt"), **dict(SPEC, num_classes=43))
    with pytest.raises(NFTError, match="missing keys|unexpected keys"):
        io.load_model(str(tmp_path / "w.pt"), **dict(SPEC, arch="tinyvit", arch_kwargs={}))
    with pytest.raises(NFTError, match="--arch NAME --num-classes N"):
        io.load_model(str(tmp_path / "w.pt"))
    with pytest.raises(NFTError, match="--normalize"):
        io.load_model(str(tmp_path / "w.pt"), **dict(SPEC, normalize=None))


def test_no_state_dict_and_odd_contents(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "a.pt")
    with pytest.raises(NFTError, match="found no state_dict"):
        io.load_model(str(tmp_path / "a.pt"), **SPEC)
    torch.save([torch.zeros(2)], tmp_path / "b.pt")
    with pytest.raises(NFTError, match="found no state_dict"):
        find_state_dict(read_tensors(str(tmp_path / "b.pt"))[0])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip_header"])
def test_corrupt_files_fail_cleanly(tmp_path, net, damage):
    for name, save in [("w.pt", lambda p: torch.save(net.net.state_dict(), p)),
                       ("w.safetensors", lambda p: io.atomic_save_safetensors(net.net.state_dict(), p))]:
        p = str(tmp_path / name)
        save(p)
        data = open(p, "rb").read()
        data = {"truncate": data[: len(data) // 3], "garbage": os.urandom(300), "empty": b"",
                "flip_header": b"\xff" * 8 + data[8:]}[damage]
        open(p, "wb").write(data)
        with pytest.raises(NFTError):
            io.load_model(p, **SPEC)


def test_nan_weights_are_caught_by_the_probe(tmp_path, net):
    sd = net.net.state_dict()
    sd["head.bias"][0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(NFTError, match="NaN or infinite"):
        io.load_model(str(tmp_path / "nan.pt"), **SPEC)


def test_wrong_input_shape_is_caught_by_the_probe(tmp_path):
    torch.save(build_model("tinyvit", 10, 1).net.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(NFTError, match="does not run on inputs of shape"):
        io.load_model(str(tmp_path / "vit.pt"), arch="tinyvit", num_classes=10, normalize="none",
                      input_shape="1,20,20")


def _run_dir(tmp_path, net):
    d = str(tmp_path / "run")
    io.save_model(net, d, {"arch": "smallcnn", "arch_kwargs": {"width": 4}, "num_classes": 10,
                           "input_shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081]})
    return d


def test_run_dir_tampering(tmp_path, net):
    d = _run_dir(tmp_path, net)
    model, m = io.load_model(d)
    assert _same(model, net)
    assert _same(io.load_model(os.path.join(d, "model.safetensors"))[0], net)
    with pytest.raises(NFTError, match="contradicts the manifest"):
        io.load_model(d, num_classes=43)
    mpath = os.path.join(d, "manifest.json")
    good = json.load(open(mpath))
    for bad, match in [({"weights": "../../etc/passwd"}, "file name inside"), ({"num_classes": "ten"}, "num_classes"),
                       ({"input_shape": [1, 28]}, "input_shape"), ({"std": [0.0]}, "std"),
                       ({"arch_kwargs": {"widht": 4}}, "cannot build"), ({"arch": "resnett"}, "did you mean")]:
        json.dump({**good, **bad}, open(mpath, "w"))
        with pytest.raises(NFTError, match=match):
            io.load_model(d)
    json.dump(good, open(mpath, "w"))
    w = os.path.join(d, "model.safetensors")
    open(w, "ab").write(b"\0")
    with pytest.raises(NFTError, match="sha256"):
        io.load_model(d)
    open(mpath, "w").write('{"arch": ')
    with pytest.raises(NFTError, match="not valid JSON"):
        io.load_model(d)


def test_normalize_parsing():
    assert parse_normalize("CIFAR10")[2] == (3, 32, 32)
    assert parse_normalize("0.5,0.5/0.25,0.25")[:2] == ((0.5, 0.5), (0.25, 0.25))
    for bad in ["cifar", "0.5/0", "1,2/3", "a/b", "/", "0.5/inf"]:
        with pytest.raises(NFTError):
            parse_normalize(bad)


# -- writing -------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    p = str(tmp_path / "a.json")
    io.atomic_write_json({"v": 1}, p)

    def full(fd, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(NFTError, match="disk is full"):
        io.atomic_write_json({"v": 2}, p)
    assert json.load(open(p)) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"], "no temporary file may be left behind"


def test_staged_dir(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with io.StagedDir(out) as tmp:
            io.atomic_write_text("half", os.path.join(tmp, "a.txt"))
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    with io.StagedDir(out) as tmp:
        io.atomic_write_text("v1", os.path.join(tmp, "a.txt"))
    assert open(os.path.join(out, "a.txt")).read() == "v1"
    assert oct(os.stat(os.path.join(out, "a.txt")).st_mode & 0o777) != oct(0o600)
    with pytest.raises(NFTError, match="exists; pass --overwrite"):
        io.StagedDir(out)
    with io.StagedDir(out, overwrite=True) as tmp:
        io.atomic_write_text("v2", os.path.join(tmp, "b.txt"))
    assert os.listdir(out) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_staged_dir_removes_what_a_killed_process_left(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: whatever it left is stale
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    with io.StagedDir(str(tmp_path / "out")) as tmp:
        io.atomic_write_text("ok", os.path.join(tmp, "a.txt"))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _mount_tiny_tmpfs(path):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("needs permission to mount a tiny tmpfs")


def test_real_full_disk(tmp_path, net):
    """On a 64 KiB file system the weights do not fit: one clear error, nothing left behind."""
    disk = tmp_path / "disk"
    _mount_tiny_tmpfs(disk)
    try:
        big = build_model("smallcnn", 10, 1, width=32)
        with pytest.raises(NFTError, match="disk is full"):
            with io.StagedDir(str(disk / "out")) as tmp:
                io.save_model(big, tmp, {"arch": "smallcnn"})
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_atomic_write_takes_bytes_or_a_writer(tmp_path):
    """plots.py and others write through a function of the temporary path (matplotlib's savefig)."""
    io._atomic_write(str(tmp_path / "a.bin"), b"\x00\x01")
    io._atomic_write(str(tmp_path / "b.txt"), lambda p: open(p, "w").write("from a writer"))
    assert open(tmp_path / "a.bin", "rb").read() == b"\x00\x01"
    assert open(tmp_path / "b.txt").read() == "from a writer"
    with pytest.raises(ZeroDivisionError):
        io._atomic_write(str(tmp_path / "c.txt"), lambda p: 1 / 0)
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt"]
