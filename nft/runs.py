"""Run directories: rebuild the dataset, attack and clean set a model was made with."""
from __future__ import annotations

import os

from .attacks import build_attack
from .data import CleanSet, load_dataset
from .errors import NFTError
from .io import load_safetensors


def attack_from_run(run_dir: str, manifest: dict):
    """The attack recorded in the manifest, with its artifact (trigger, generator) from the run directory."""
    spec = manifest.get("attack")
    if not spec:
        return None
    attack = build_attack(spec["name"], **spec["params"])
    path = os.path.join(run_dir, "attack.safetensors")
    if os.path.isfile(path):
        attack.load_state_dict(load_safetensors(path))
    elif attack.state_dict():
        raise NFTError(f"{run_dir} lacks attack.safetensors, which {spec['name']} needs to reproduce its trigger")
    return attack


def dataset_of(manifest: dict, data_root: str | None = None, download: bool = False):
    name = manifest.get("dataset")
    if not name:
        raise NFTError("the manifest names no dataset; pass --clean-npz and evaluate with your own data")
    return load_dataset(name, root=data_root, download=download, **manifest.get("dataset_kwargs", {}))


def clean_set(pool, num_classes: int, augment: str, per_class=None, fraction=None, seed=0) -> CleanSet:
    if per_class is None and fraction is None:
        per_class = 50
    return CleanSet.pick(pool, num_classes, per_class=per_class, fraction=fraction, seed=seed, augment=augment)
