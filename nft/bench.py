"""The benchmark: attacks x defenses x seeds x clean-set sizes -> one JSON record per cell.

Two phases: every distinct backdoored (or benign) model is trained once and cached under
``models/<key>`` (its key hashes everything that determines it), then the defense cells fan out over
the cached models. A file lock around training means two processes that want the same model never
train it twice, and the model directory is renamed into place only when complete. A record is
written atomically only after its cell finished, so a killed bench restarts where it stopped.
"""
from __future__ import annotations

import fcntl
import functools
import os
import platform
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attacks import build_attack
from .attacks.base import fit_attack
from .data.core import DatasetSplits, ImageData
from .defenses import get_defense
from .errors import NFTError
from .evaluate import evaluate, poisoned_test_set
from .io import StagedDir, atomic_save_safetensors, atomic_write_text, code_version, load_model, read_manifest
from .metrics import der
from .profile import measure
from .records import (BENIGN, NO_DEFENSE, SCHEMA, CellSpec, ModelSpec, has_record, parse_defense, to_dict,
                      write_record)
from .runs import attack_from_run, clean_set
from .runtime import Runtime
from .trainer import TrainConfig, manifest_for, save_run, train_model


@dataclass
class RunOptions:
    """How (not what) to run: never part of a cell's identity."""

    device: str = "cpu"
    threads: int | None = 1
    progress: bool = False

    def runtime(self, spec: ModelSpec) -> Runtime:
        return Runtime(device=self.device, precision=spec.precision, seed=spec.seed, threads=self.threads,
                       progress=self.progress)


# ---------------------------------------------------------------------------------------------
# data, attack, model

def _subset(d: ImageData, n: int | None) -> ImageData:
    if not n or n >= len(d):
        return d
    idx = torch.randperm(len(d), generator=torch.Generator().manual_seed(12345))[:n].sort().values
    return d.subset(idx)


@functools.lru_cache(maxsize=4)
def load_data(dataset: str, subset_train: int | None = None, subset_test: int | None = None) -> DatasetSplits:
    from .data import load_dataset

    data = load_dataset(dataset)
    data.train, data.test = _subset(data.train, subset_train), _subset(data.test, subset_test)
    return data


def data_for(spec: ModelSpec) -> DatasetSplits:
    return load_data(spec.dataset, spec.subset_train, spec.subset_test)


def attack_for(spec: ModelSpec, data: DatasetSplits):
    if spec.attack == BENIGN:
        return None
    return build_attack(spec.attack, num_classes=data.num_classes, image_shape=data.input_shape, target=spec.target,
                        mode=spec.label_mode, seed=spec.seed, **spec.attack_kwargs)


def train_config(spec: ModelSpec) -> TrainConfig:
    return TrainConfig(arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), epochs=spec.epochs,
                       batch_size=spec.batch_size, lr=spec.lr,
                       poison_rate=0.0 if spec.attack == BENIGN else spec.poison_rate)


def model_dir(root: str, spec: ModelSpec) -> str:
    return os.path.join(root, "models", spec.key)


@contextmanager
def file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_model(root: str, spec: ModelSpec, opts: RunOptions) -> tuple[str, bool]:
    """(the cached run directory of ``spec``, whether this call trained it). Training happens once,
    under a lock, and the directory appears complete or not at all."""
    mdir = model_dir(root, spec)
    if os.path.isfile(os.path.join(mdir, "manifest.json")):
        return mdir, False
    with file_lock(mdir + ".lock"):
        if os.path.isfile(os.path.join(mdir, "manifest.json")):  # another process trained it meanwhile
            return mdir, False
        rt = opts.runtime(spec)
        data = data_for(spec)
        attack, cfg = attack_for(spec, data), train_config(spec)
        with measure(rt.device) as cost:
            if attack is not None:
                fit_attack(attack, data, rt)
            model, info = train_model(data, cfg, rt, attack)
        metrics = evaluate(model, data.test, attack, rt)
        manifest = manifest_for(data, cfg, rt, attack, metrics=metrics, train_seconds=cost.seconds,
                                train_peak_mb=cost.peak_mb, bench_model=to_dict(spec), model_key=spec.key)
        with StagedDir(mdir, overwrite=True) as tmp:
            save_run(tmp, model, manifest, attack, info["history"])
    return mdir, True


# ---------------------------------------------------------------------------------------------
# records

@functools.lru_cache(None)
def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type: float results of a fit can differ between CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def _base_record(cell: CellSpec, opts: RunOptions, manifest: dict) -> dict:
    m = cell.model
    return {
        "schema": SCHEMA, "cell_id": cell.cell_id, "dataset": m.dataset, "model": m.arch,
        "model_kwargs": m.arch_kwargs, "attack": m.attack, "defense": cell.defense, "seed": m.seed,
        "clean_per_class": None if cell.defense == NO_DEFENSE else cell.clean_per_class, "clean_images": 0,
        "poison_rate": 0.0 if m.attack == BENIGN else m.poison_rate,
        "before": manifest.get("metrics", {}), "device": opts.device, "threads": opts.threads,
        "config": to_dict(cell), "defense_config": {}, "model_key": m.key, "history": [], "artifacts": {},
        "code_version": code_version(), "torch": torch.__version__, "model_sha256": manifest.get("sha256"),
        "cpu": cpu_name(), "host": socket.gethostname(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def undefended_record(cell: CellSpec, opts: RunOptions, manifest: dict) -> dict:
    """The 'none' cell: the backdoored model as trained. Its cost is the training's."""
    met = manifest.get("metrics", {})
    return dict(_base_record(cell, opts, manifest), acc=met.get("acc"), asr=met.get("asr"), ra=met.get("ra"),
                der=None, seconds=None, peak_mb=None, train_seconds=manifest.get("train_seconds"),
                train_peak_mb=manifest.get("train_peak_mb"))


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, dict)) and len(str(v)) < 20000)


def run_defense(root: str, cell: CellSpec, opts: RunOptions, save_model: bool = False) -> dict:
    """Run one defense cell on its cached model; returns the record (not yet written)."""
    mdir, _ = ensure_model(root, cell.model, opts)
    manifest = read_manifest(mdir)
    if cell.defense == NO_DEFENSE:
        return undefended_record(cell, opts, manifest)
    rt = opts.runtime(cell.model)
    model, manifest = load_model(mdir, rt.device)
    data = data_for(cell.model)
    attack = attack_from_run(mdir, manifest)
    poisoned = poisoned_test_set(data.test, attack) if attack is not None else None
    seed = cell.model.seed if cell.clean_seed is None else cell.clean_seed
    clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=cell.clean_per_class, seed=seed)
    name, variant = parse_defense(cell.defense)
    defend = get_defense(name)
    cfg = dict(cell.defense_set)
    if variant:
        cfg.setdefault("recipe", variant)
    monitor_seconds = [0.0, 0.0]  # wall-clock, CPU

    def monitor(m):
        t0, c0 = time.perf_counter(), time.process_time()
        out = evaluate(m, data.test, runtime=rt, poisoned=poisoned)
        monitor_seconds[0] += time.perf_counter() - t0
        monitor_seconds[1] += time.process_time() - c0
        return out

    rt.seed_everything()
    with measure(rt.device) as cost:
        result = defend(model, clean, cfg, rt, monitor=monitor)
    after = evaluate(result.model, data.test, runtime=rt, poisoned=poisoned)
    before = manifest.get("metrics", {})
    extras = dict(result.extras)
    mask_state = extras.pop("mask_state", None)
    rec = _base_record(cell, opts, manifest)
    rec.update(acc=after["acc"], asr=after.get("asr"), ra=after.get("ra"), clean_images=len(clean),
               der=der(before["acc"], before["asr"], after["acc"], after["asr"]) if "asr" in after else None,
               seconds=max(0.0, cost.seconds - monitor_seconds[0]), monitor_seconds=monitor_seconds[0],
               cpu_seconds=max(0.0, cost.cpu_seconds - monitor_seconds[1]),
               peak_mb=cost.peak_mb, defense_config=extras.pop("config", cfg),
               extras={k: v for k, v in extras.items() if _jsonable(v) and k != "mask_layout"},
               history=[{k: h[k] for k in ("step", "acc", "asr", "ra", "loss") if k in h}
                        for h in result.history if "acc" in h])
    adir = os.path.join(root, "artifacts", cell.cell_id)
    if mask_state:
        atomic_save_safetensors(mask_state, os.path.join(adir, "masks.safetensors"))
        rec["artifacts"]["masks"] = os.path.relpath(os.path.join(adir, "masks.safetensors"), root)
    if save_model:
        pdir = os.path.join(adir, "purified")
        pman = {k: v for k, v in manifest.items() if k not in ("sha256", "weights", "code_version")}
        pman.update(metrics=after, purified={"defense": cell.defense, "cell_id": cell.cell_id,
                                             "config": rec["defense_config"], "clean_images": len(clean)})
        with StagedDir(pdir, overwrite=True) as tmp:
            save_run(tmp, result.model, pman, attack)
        rec["artifacts"]["purified"] = os.path.relpath(pdir, root)
    rec["artifacts"]["backdoored"] = os.path.relpath(mdir, root)
    return rec


# ---------------------------------------------------------------------------------------------
# tasks (module-level functions: picklable for process pools and Ray)

def model_task(root: str, spec: dict, opts: dict) -> dict:
    """Phase 1: train (or find) one model and write its 'none' record."""
    cell = CellSpec(model=ModelSpec(**spec), defense=NO_DEFENSE, clean_per_class=None)
    return _guarded(root, cell, RunOptions(**opts), False)


def cell_task(root: str, cell: dict, opts: dict, save_model: bool = False) -> dict:
    """Phase 2: one defense cell."""
    return _guarded(root, CellSpec.from_dict(cell), RunOptions(**opts), save_model)


def _guarded(root: str, cell: CellSpec, opts: RunOptions, save_model: bool) -> dict:
    cid = cell.cell_id
    if has_record(root, cid):
        return {"cell_id": cid, "status": "skipped"}
    t0 = time.perf_counter()
    try:
        rec = run_defense(root, cell, opts, save_model)
        write_record(root, rec)
    except Exception as e:  # one failed cell must not stop the grid; its traceback is kept
        atomic_write_text(traceback.format_exc(), os.path.join(root, "errors", f"{cid}.txt"))
        return {"cell_id": cid, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    return {"cell_id": cid, "status": "done", "acc": rec["acc"], "asr": rec["asr"],
            "wall": time.perf_counter() - t0}


def rerun(record: dict, opts: RunOptions, workdir: str, tolerance: float = 1.0) -> dict:
    """Re-run one cell from its record's config in ``workdir`` (training its model afresh)."""
    cell = CellSpec.from_dict(record["config"])
    if os.path.exists(model_dir(workdir, cell.model)):
        raise NFTError(f"{workdir} already holds this cell's model; give an empty --out for a fresh re-run")
    new = run_defense(workdir, cell, opts, save_model=False)
    diffs = {k: abs(new[k] - record[k]) for k in ("acc", "asr") if record.get(k) is not None}
    return {"cell_id": record["cell_id"], "recorded": {k: record.get(k) for k in ("acc", "asr", "ra")},
            "rerun": {k: new.get(k) for k in ("acc", "asr", "ra")}, "abs_diff": diffs,
            "within_tolerance": all(d <= tolerance for d in diffs.values()), "tolerance": tolerance,
            # whether the re-trained backdoored model is the recorded one, byte for byte (None: the record
            # predates model_sha256); a different one (another torch, another CPU) explains a drift
            "same_model": None if not record.get("model_sha256") else new["model_sha256"] == record["model_sha256"],
            "torch": {"recorded": record.get("torch"), "rerun": new["torch"]}, "record": new}


__all__ = ["RunOptions", "ensure_model", "run_defense", "model_task", "cell_task", "rerun", "load_data"]
