"""Run directories: rebuild the dataset, attack and clean set a model was made with.

The manifest may come from anyone, so its attack and dataset entries are checked before use.
"""
from __future__ import annotations

import os

from .attacks import build_attack
from .data import CleanSet, load_dataset
from .errors import NFTError
from .io import load_safetensors
from .registry import ATTACKS


def attack_from_run(run_dir: str, manifest: dict):
    """The attack recorded in the manifest, with its artifact (trigger, generator) from the run directory."""
    spec = manifest.get("attack")
    if not spec:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("params", {}), dict):
        raise NFTError(f"the manifest of {run_dir} has a malformed attack entry (want name and params)")
    params = {**ATTACKS.get(spec["name"]).omitted_params, **spec.get("params", {})}
    for key, want in (("image_shape", manifest.get("input_shape")), ("num_classes", manifest.get("num_classes"))):
        if key in params and want is not None and params[key] != want:
            raise NFTError(f"the manifest of {run_dir} is inconsistent: the attack's {key} {params[key]!r} "
                           f"differs from the model's {want!r}")
    try:
        attack = build_attack(spec["name"], **params)
    except NFTError:
        raise
    except (TypeError, ValueError) as e:
        raise NFTError(f"cannot rebuild attack {spec['name']!r} from the manifest of {run_dir}: {e}") from None
    path = os.path.join(run_dir, "attack.safetensors")
    if os.path.isfile(path):
        try:
            attack.load_state_dict(load_safetensors(path))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise NFTError(f"{path} does not fit attack {spec['name']!r} ({str(e).splitlines()[0][:160]})") from None
    elif attack.state_dict():
        raise NFTError(f"{run_dir} lacks attack.safetensors, which {spec['name']} needs to reproduce its trigger")
    return attack


def dataset_of(manifest: dict, data_root: str | None = None, download: bool = False):
    name = manifest.get("dataset")
    if not name:
        raise NFTError("the model's manifest names no dataset: pass --dataset NAME "
                       "(and --clean-npz for purify to use your own clean images)")
    if not isinstance(name, str):
        raise NFTError(f"the manifest's dataset must be a name, got {name!r}")
    kwargs = manifest.get("dataset_kwargs", {})
    if not isinstance(kwargs, dict) or {"root", "download", "name"} & set(kwargs):
        raise NFTError("the manifest's dataset_kwargs must be an object without root/download")
    return read_dataset(name, data_root, download, **kwargs)


def read_dataset(name: str, root: str | None = None, download: bool = False, **kwargs):
    """load_dataset, with files that are missing, corrupt or of the wrong layout reported in one line."""
    import zipfile

    try:
        return load_dataset(name, root=root, download=download, **kwargs)
    except NFTError:
        raise
    except TypeError as e:
        raise NFTError(f"cannot load dataset {name!r} with {kwargs}: {e}") from None
    except (KeyError, ValueError, EOFError, zipfile.BadZipFile, OSError) as e:
        where = f" from {root}" if root else ""
        raise NFTError(f"cannot read dataset {name!r}{where}: {type(e).__name__}: {str(e)[:160]}") from None


def clean_set(pool, num_classes: int, augment: str, per_class=None, fraction=None, seed=0) -> CleanSet:
    if per_class is None and fraction is None:
        per_class = 50
    return CleanSet.pick(pool, num_classes, per_class=per_class, fraction=fraction, seed=seed, augment=augment)
