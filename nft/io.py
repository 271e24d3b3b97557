"""Safe, atomic artifacts: safetensors + manifest.json. Loading never unpickles code.

A run directory holds ``model.safetensors``, ``manifest.json`` and, for an attack that learned
something, ``attack.safetensors``; a defense adds ``masks.safetensors`` and ``history.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .errors import NFTError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _silent_remove(tmp)
        raise NFTError(f"could not write {path}: {e.strerror or e}") from None
    except BaseException:
        _silent_remove(tmp)
        raise


def _silent_remove(p: str) -> None:
    try:
        os.remove(p)
    except OSError:
        pass


def atomic_write_text(text: str, path: str) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, w)


def atomic_write_json(obj: Any, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tensors that share memory cloned apart (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    return out


def code_version() -> str:
    from . import __version__

    try:
        import subprocess

        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def save_model(model: nn.Module, run_dir: str, manifest: dict) -> dict:
    """Write model.safetensors then manifest.json (with the weights' sha256) into ``run_dir``."""
    os.makedirs(run_dir, exist_ok=True)
    wpath = os.path.join(run_dir, WEIGHTS)
    atomic_save_safetensors(plain_state_dict(model), wpath)
    manifest = dict(manifest, sha256=sha256_file(wpath), code_version=code_version(), weights=WEIGHTS)
    atomic_write_json(manifest, os.path.join(run_dir, MANIFEST))
    return manifest


def read_manifest(run_dir: str) -> dict:
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isfile(path):
        raise NFTError(f"no {MANIFEST} in {run_dir}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NFTError(f"{path} is not valid JSON ({e})") from None


def model_from_manifest(manifest: dict) -> nn.Module:
    from .models import build_model

    try:
        return build_model(manifest["arch"], manifest["num_classes"], manifest["input_shape"][0],
                           manifest["mean"], manifest["std"], **manifest.get("arch_kwargs", {}))
    except KeyError as e:
        raise NFTError(f"manifest lacks the field {e}") from None


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise NFTError(f"no such file: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated files
        raise NFTError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_model(run_dir: str, device: str | torch.device = "cpu", verify: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the model of a run directory from its manifest and load its safetensors weights."""
    manifest = read_manifest(run_dir)
    wpath = os.path.join(run_dir, manifest.get("weights", WEIGHTS))
    if verify and manifest.get("sha256") and os.path.isfile(wpath) and sha256_file(wpath) != manifest["sha256"]:
        raise NFTError(f"{wpath} does not match the sha256 in its manifest (modified or truncated)")
    model = model_from_manifest(manifest)
    load_state(model, load_safetensors(wpath), wpath)
    return model.to(device), manifest


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"shape of {k}: {tuple(state[k].shape)} in {source} vs {tuple(own[k].shape)} in the model")
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        raise NFTError(f"{source} does not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(state)


class StagedDir:
    """Build a run directory under a temporary name and rename it into place on success, so an
    interrupted command leaves either nothing or a complete directory.

        with StagedDir(out, overwrite) as tmp:
            save_model(..., tmp, ...)
    """

    def __init__(self, path: str, overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        if os.path.exists(self.path) and not overwrite:
            raise NFTError(f"output directory {path} exists; pass --overwrite to replace it")
        self.tmp = None

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.path)}.tmp-")
        except OSError as e:
            raise NFTError(f"cannot create {self.path}: {e.strerror or e}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.path):
            old = self.tmp + ".old"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False
