"""nft bench: record schema, model cache and lock, resume after SIGKILL, re-run of a cell, Ray.

Tiny cells: smallcnn width 4 on a 600-image subset of mnist10k, one epoch, NFT for 12 steps.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nft.bench import RunOptions
from nft.cli import main
from nft.grid import expand_grid, run_grid
from nft.records import (BENIGN, NO_DEFENSE, RECORD_KEYS, CellSpec, ModelSpec, digest, load_records,
                         record_path)

TINY = ModelSpec(dataset="mnist10k", arch="smallcnn", arch_kwargs={"width": 4}, epochs=1, batch_size=64,
                 subset_train=600, subset_test=300)
NFT_SET = {"nft": {"steps": 12, "eval_every": 4, "log_every": 4, "batch_size": 32}}
CLI_TINY = ["--model", "smallcnn", "--width", "4", "--epochs", "1", "--batch-size", "64", "--subset-train", "600",
            "--subset-test", "300", "--set", "nft.steps=12", "--set", "nft.eval_every=4", "--set", "nft.log_every=4",
            "--set", "nft.batch_size=32",
            "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench"))
    models, cells, save = expand_grid(TINY, ["badnets"], ["nft:default", "nft:paper"], [0], [5, 2], NFT_SET)
    counts = run_grid(root, models, cells, save, RunOptions(threads=1), inline=True, log=lambda s: None)
    return root, models, cells, save, counts


def test_grid_expansion_includes_benign_and_validates_names():
    models, cells, save = expand_grid(TINY, ["badnets", "blend"], ["nft:default", "nft:paper"], [0, 1], [50, 5])
    assert [m.attack for m in models] == [BENIGN, BENIGN, "badnets", "badnets", "blend", "blend"]
    assert len(cells) == 6 * 2 * 2
    assert [(c.model.seed, c.model.attack) for c in cells[::4]] == [(0, "badnets"), (0, "blend"), (0, BENIGN),
                                                                    (1, "badnets"), (1, "blend"), (1, BENIGN)]
    assert len({c.cell_id for c in cells}) == len(cells)
    assert all(c.model.seed == 0 and c.clean_per_class == 50 for c in cells if c.cell_id in save)
    assert len(save) == 3 * 2
    from nft.errors import NFTError

    for bad in (dict(attacks=["nosuch"]), dict(defenses=["nosuch"]), dict(defenses=["nft:nosuch"]),
                dict(sets={"typo": {"steps": 1}})):
        kw = dict(attacks=["badnets"], defenses=["nft"], seeds=[0], clean_sizes=[5], sets=None) | bad
        with pytest.raises(NFTError):
            expand_grid(TINY, **kw)


def test_issbas_changed_defaults_are_written_into_the_spec():
    """ISSBA's fit defaults changed (1200 steps, ramp_by 400) after records with no ISSBA settings existed: the grid
    writes them into the spec, so a default grid neither reuses an old-default model nor skips an old-default cell,
    and it matches the cells made with the same settings given explicitly; a --set still wins."""
    from nft.attacks import build_attack

    assert {k: build_attack("issba", num_classes=10, image_shape=(1, 28, 28)).params()[k] for k in ("steps", "ramp_by")} \
        == {"steps": 1200, "ramp_by": 400}
    old = ModelSpec(**{**TINY.__dict__, "attack": "issba", "seed": 0})
    explicit = expand_grid(TINY, ["issba"], ["nft"], [0], [5], {"issba": {"steps": 1200, "ramp_by": 400}}, benign=False)
    default = expand_grid(TINY, ["issba"], ["nft"], [0], [5], benign=False)
    assert default[0][0].attack_kwargs == {"steps": 1200, "ramp_by": 400} and default[0][0].key != old.key
    assert default[0][0].key == explicit[0][0].key and default[1][0].cell_id == explicit[1][0].cell_id
    first = expand_grid(TINY, ["issba", "badnets"], ["nft"], [0], [5], {"issba": {"steps": 800, "ramp_by": None}},
                        benign=False)[0]
    assert first[0].attack_kwargs == {"steps": 800, "ramp_by": None} and first[1].attack_kwargs == {}


def test_model_key_and_cell_id_follow_the_config():
    a = ModelSpec(**{**TINY.__dict__, "attack": "badnets"})
    b = ModelSpec(**{**TINY.__dict__, "attack": "badnets", "epochs": 2})
    assert a.key != b.key and a.key == ModelSpec(**{**TINY.__dict__, "attack": "badnets"}).key
    c1, c2 = CellSpec(model=a, defense="nft:default"), CellSpec(model=a, defense="nft:default", clean_per_class=5)
    assert c1.cell_id != c2.cell_id
    assert CellSpec.from_dict(json.loads(json.dumps(c2.__dict__ | {"model": a.__dict__}))).cell_id == c2.cell_id


def test_record_schema(grid):
    root, models, cells, save, counts = grid
    assert counts == {"done": len(models) + len(cells), "skipped": 0, "failed": 0}
    recs = load_records(root)
    assert len(recs) == len(models) + len(cells) == 10
    for r in recs:
        assert set(RECORD_KEYS) <= set(r), set(RECORD_KEYS) - set(r)
        assert r["dataset"] == "mnist10k" and r["model"] == "smallcnn" and r["model_kwargs"] == {"width": 4}
        assert r["attack"] in (BENIGN, "badnets") and r["seed"] == 0
        assert CellSpec.from_dict(r["config"]).cell_id == r["cell_id"]
        assert 0 <= r["acc"] <= 100 and r["code_version"] and r["torch"] == torch.__version__
        assert r["cpu"] and len(r["model_sha256"]) == 64 and int(r["model_sha256"], 16) >= 0  # the weights the cell ran on
        if r["attack"] == BENIGN:
            assert r["asr"] is None and r["der"] is None
        if r["defense"] == NO_DEFENSE:
            assert r["clean_per_class"] is None and r["train_seconds"] > 0
            continue
        assert r["clean_images"] == 10 * r["clean_per_class"]
        assert r["seconds"] > 0 and r["peak_mb"] >= 0
        # CPU time of this process (one thread): positive, and not above the wall-clock by more than
        # the sampler's share
        assert 0 < r["cpu_seconds"] <= 1.5 * r["seconds"] + 0.5
        assert r["defense_config"]["steps"] == 12 and r["defense_config"]["recipe"] == r["defense"].split(":")[1]
        assert [h["step"] for h in r["history"]] == [0, 4, 8, 12]
        assert all("acc" in h for h in r["history"])
        if r["attack"] == "badnets":
            assert 0 <= r["der"] <= 1 and "asr" in r["history"][-1]
            assert r["before"]["asr"] is not None
        assert os.path.isfile(os.path.join(root, r["artifacts"]["masks"]))
        kept = r["cell_id"] in save
        assert ("purified" in r["artifacts"]) == kept
    # each model trained once, shared by all its defense cells
    model_dirs = [d for d in os.listdir(os.path.join(root, "models")) if not d.startswith(".") and
                  os.path.isdir(os.path.join(root, "models", d))]
    assert sorted(model_dirs) == sorted(m.key for m in models)


def test_rerun_skips_everything(grid):
    root, models, cells, save, _ = grid
    rdir = os.path.join(root, "records")
    before = {f: os.stat(os.path.join(rdir, f)).st_mtime_ns for f in os.listdir(rdir)}
    counts = run_grid(root, models, cells, save, RunOptions(threads=1), inline=True, log=lambda s: None)
    assert counts == {"done": 0, "skipped": 10, "failed": 0}
    assert before == {f: os.stat(os.path.join(rdir, f)).st_mtime_ns for f in os.listdir(rdir)}


def test_rerun_one_cell_reproduces_acc_and_asr(grid, tmp_path, capsys):
    root, _, cells, _, _ = grid
    cell = next(c for c in cells if c.model.attack == "badnets" and c.defense == "nft:default")
    rc = main(["bench", "--rerun", record_path(root, cell.cell_id), "--threads", "1", "--no-progress"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["within_tolerance"], out
    assert out["abs_diff"]["acc"] <= 1 and out["abs_diff"]["asr"] <= 1
    assert out["same_model"] is True and out["torch"]["rerun"] == torch.__version__


def test_failed_cell_is_reported_not_recorded(tmp_path):
    models, cells, save = expand_grid(TINY, ["badnets"], ["nft"], [0], [5], {"nft": {"steps": 2, "lr": "bad"}},
                                      benign=False)
    counts = run_grid(str(tmp_path), models, cells, save, RunOptions(threads=1), inline=True, log=lambda s: None)
    assert counts == {"done": 1, "skipped": 0, "failed": 1}
    assert len(load_records(str(tmp_path))) == 1
    assert os.listdir(tmp_path / "errors") == [cells[0].cell_id + ".txt"]


def _bench_cmd(out):
    return [sys.executable, "-m", "nft", "bench", "--attacks", "badnets", "--defenses", "nft:default,nft:paper",
            "--seeds", "0", "--clean-per-class", "5,2", "--inline", "--out", out] + CLI_TINY


def test_resume_after_sigkill(tmp_path):
    out = str(tmp_path / "res")
    rdir = os.path.join(out, "records")
    proc = subprocess.Popen(_bench_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(rdir) and len([f for f in os.listdir(rdir) if f.endswith(".json") and
                                        not f.startswith(".")]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the bench finished before it could be killed midway"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {f: (os.stat(os.path.join(rdir, f)).st_mtime_ns, open(os.path.join(rdir, f)).read())
             for f in os.listdir(rdir) if f.endswith(".json") and not f.startswith(".")}
    assert first and all(json.loads(v[1])["cell_id"] + ".json" == f for f, v in first.items())
    res = subprocess.run(_bench_cmd(out), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 3 <= len(first) < 10
    assert f"skipping {len(first)} finished cell(s) of 10" in res.stdout
    assert f"{10 - len(first)} done, {len(first)} skipped" in res.stdout
    recs = load_records(out)
    assert len(recs) == 10 and len({r["cell_id"] for r in recs}) == 10
    for f, (mtime, text) in first.items():  # finished cells were not run again, nor rewritten
        assert os.stat(os.path.join(rdir, f)).st_mtime_ns == mtime and open(os.path.join(rdir, f)).read() == text
    models = [d for d in os.listdir(os.path.join(out, "models")) if not d.startswith(".")
              and os.path.isdir(os.path.join(out, "models", d))]
    assert len(models) == 2


def _ensure(root, spec):
    from nft.bench import ensure_model

    return ensure_model(root, ModelSpec(**spec), RunOptions(threads=1))[1]


def test_concurrent_cells_train_a_shared_model_once(tmp_path):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    spec = dict(TINY.__dict__, attack="badnets")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        trained = list(pool.map(_ensure, [str(tmp_path)] * 3, [spec] * 3))
    assert sorted(trained) == [False, False, True]
    assert len([d for d in os.listdir(tmp_path / "models") if not d.startswith(".") and
                os.path.isdir(tmp_path / "models" / d)]) == 1


def test_two_cells_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'nft[ray]')")
    models, cells, save = expand_grid(TINY, ["badnets"], ["nft:default"], [0], [5], NFT_SET, benign=False)
    assert len(models) + len(cells) == 2
    try:
        counts = run_grid(str(tmp_path), models, cells, save, RunOptions(threads=1), jobs=2, ray_address="local",
                          log=lambda s: None)
    finally:
        ray.shutdown()
    assert counts == {"done": 2, "skipped": 0, "failed": 0}
    assert len(load_records(str(tmp_path))) == 2


def test_torn_and_temporary_records_are_ignored(grid, tmp_path):
    import shutil

    root = str(tmp_path / "copy")
    shutil.copytree(os.path.join(grid[0], "records"), os.path.join(root, "records"))
    with open(os.path.join(root, "records", ".tmp-abc-x.json"), "w") as f:
        f.write('{"cell_id": "half')
    with open(os.path.join(root, "records.jsonl"), "w") as f:
        f.write(json.dumps({"cell_id": "extra", "acc": 1.0}) + "\n" + '{"cell_id": "torn", "ac')
    ids = [r["cell_id"] for r in load_records(root, warn=False)]
    assert len(ids) == 11 and "extra" in ids and "torn" not in ids
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})


INTERRUPT_SCRIPT = """
import multiprocessing as mp, os, signal, sys, threading, time
from nft.bench import RunOptions
from nft.grid import _executor


def interrupt_once_running():  # the workers can take seconds to start on a loaded machine
    until = time.time() + 60
    while time.time() < until and len([p for p in mp.active_children() if p.is_alive()]) < 2:
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job inherits SIGINT ignored
    gen = _executor([(time.sleep, 120), (time.sleep, 120)], 2, None, RunOptions(threads=1))
    threading.Thread(target=interrupt_once_running, daemon=True).start()
    t0 = time.time()
    try:
        next(gen)
        sys.exit("no KeyboardInterrupt")
    except KeyboardInterrupt:
        pass
    deadline = time.time() + 20
    while time.time() < deadline and any(p.is_alive() for p in mp.active_children()):
        time.sleep(0.1)
    alive = [p for p in mp.active_children() if p.is_alive()]
    took = time.time() - t0
    sys.exit(f"workers still alive: {alive}" if alive else (f"took {took:.0f} s" if took > 90 else 0))
"""


def test_interrupted_pool_stops_its_running_cells(tmp_path):
    """Ctrl-C/SIGINT during a cell: the worker processes are terminated, not waited for (an
    interrupted bench used to hang until its current cell finished). Run in a fresh interpreter that
    restores Python's SIGINT handler: under `cmd &` in a script, SIGINT arrives ignored."""
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=200, cwd=root)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
