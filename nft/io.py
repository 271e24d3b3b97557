"""Safe, atomic artifacts: safetensors + manifest.json. Loading never unpickles code.

A run directory holds ``model.safetensors``, ``manifest.json`` and, for an attack that learned
something, ``attack.safetensors``; a defense adds ``masks.safetensors`` and ``history.json``.

Every file is written to a temporary name in its directory, fsynced and renamed into place, and a
command builds its whole output directory under a temporary name (:class:`StagedDir`), so a crash,
a kill or a full disk leaves either nothing or a complete result. Foreign checkpoint files (no
manifest) go through :mod:`nft.checkpoints`.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .errors import NFTError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path: str, e: OSError) -> NFTError:
    """One line for a failed write; a full disk says so."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NFTError(f"could not write {path}: the disk is full (nothing was left behind)")
    return NFTError(f"could not write {path}: {e.strerror or e}")


def _atomic_write(path: str, data) -> None:
    """Write ``data`` (bytes, or a function that writes to the path it is given) to a temporary file in
    the same directory, fsync, then rename over ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(tmp)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(d)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            _silent_remove(tmp)


def _silent_remove(p: str) -> None:
    try:
        os.remove(p)
    except OSError:
        pass


def atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, text.encode("utf-8"))


def atomic_write_json(obj: Any, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Serialize in memory first, so that a full disk surfaces as an OSError from our own write."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic_write(path, safetensors_bytes(tensors, metadata=meta))


def atomic_copy(src: str, dst: str) -> None:
    try:
        with open(src, "rb") as f:
            data = f.read()
    except OSError as e:
        raise NFTError(f"could not read {src}: {e.strerror or e}") from None
    _atomic_write(dst, data)


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


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version + git commit, read once per process (so a long run's records all name the code
    it started with, not whatever HEAD is when each is written); '.dirty' marks uncommitted changes."""
    from . import __version__

    try:
        import subprocess

        here = os.path.dirname(__file__)
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here).stdout.strip()
        if sha and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], capture_output=True,
                                  text=True, timeout=5, cwd=here).stdout.strip():
            sha += ".dirty"
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


# -- reading ----------------------------------------------------------------------------------------
def read_manifest(run_dir: str) -> dict:
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isfile(path):
        raise NFTError(f"no {MANIFEST} in {run_dir}")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise NFTError(f"{path} is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(m, dict):
        raise NFTError(f"{path} must hold a JSON object, not {type(m).__name__}")
    return m


def _numbers(v, n: int | None = None, positive=False) -> bool:
    ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                     for x in v)
    return ok and (n is None or len(v) == n) and (not positive or all(x > 0 for x in v))


def check_manifest(m: dict, source: str = "manifest") -> None:
    """Reject a manifest whose model fields are missing or of the wrong type (it may be hand-edited or hostile)."""
    for key in ("arch", "num_classes", "input_shape", "mean", "std"):
        if key not in m:
            raise NFTError(f"{source} lacks the field {key!r}")
    if not isinstance(m["arch"], str) or not m["arch"]:
        raise NFTError(f"{source}: arch must be a model name, got {m['arch']!r}")
    nc = m["num_classes"]
    if not isinstance(nc, int) or isinstance(nc, bool) or not 1 <= nc <= 1_000_000:
        raise NFTError(f"{source}: num_classes must be a positive integer, got {nc!r}")
    shape = m["input_shape"]
    if not (_numbers(shape, 3, positive=True) and all(isinstance(x, int) for x in shape)
            and shape[0] <= 64 and shape[1] * shape[2] <= 4096 * 4096):
        raise NFTError(f"{source}: input_shape must be [C, H, W] with positive integers, got {shape!r}")
    if not _numbers(m["mean"], shape[0]) or not _numbers(m["std"], shape[0], positive=True):
        raise NFTError(f"{source}: mean and std must list {shape[0]} finite numbers (std > 0)")
    if not isinstance(m.get("arch_kwargs", {}), dict):
        raise NFTError(f"{source}: arch_kwargs must be an object")
    w = m.get("weights", WEIGHTS)
    if not isinstance(w, str) or os.path.basename(w) != w or w in ("", ".", ".."):
        raise NFTError(f"{source}: weights must be a file name inside the run directory, got {w!r}")


def model_from_manifest(manifest: dict, source: str = "manifest") -> nn.Module:
    from .models import build_model

    check_manifest(manifest, source)
    kwargs = manifest.get("arch_kwargs", {})
    try:
        return build_model(manifest["arch"], manifest["num_classes"], manifest["input_shape"][0],
                           manifest["mean"], manifest["std"], **kwargs)
    except NFTError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # bad arch_kwargs: unknown name, zero width, ...
        raise NFTError(f"cannot build {manifest['arch']} with {kwargs or 'its defaults'}: {str(e).splitlines()[0]}") from None


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise NFTError(f"no such file: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated files
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise NFTError(f"{path} is not a readable safetensors file (corrupt or truncated? {first})") from None


@torch.no_grad()
def probe(model: nn.Module, manifest: dict, source: str) -> None:
    """Run two grey images through the model: it must accept the input shape and give finite logits."""
    shape = tuple(manifest["input_shape"])
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        out = model(torch.full((2, *shape), 0.5, device=dev))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise NFTError(f"{source}: the model does not run on inputs of shape {shape} "
                       f"({str(e).splitlines()[0][:160]}); check --input-shape/--arch") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, manifest["num_classes"]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NFTError(f"{source}: the model gives outputs of shape {got}, expected (N, {manifest['num_classes']})")
    if not torch.isfinite(out).all():
        raise NFTError(f"{source}: the model gives NaN or infinite logits (corrupt weights?)")


def load_model(path: str, device: str | torch.device = "cpu", verify: bool = True, **spec) -> tuple[nn.Module, dict]:
    """Load a model: a run directory (manifest + safetensors), or a foreign checkpoint file described by
    ``spec`` (arch, num_classes, normalize, input_shape, arch_kwargs; see nft.checkpoints.load_checkpoint).
    The weights are checked against the manifest's sha256, fitted key by key and probed with a forward pass."""
    run_dir = path if os.path.isdir(path) else None
    if os.path.basename(path) == WEIGHTS and os.path.isfile(os.path.join(os.path.dirname(path) or ".", MANIFEST)):
        run_dir = os.path.dirname(path) or "."  # run_dir/model.safetensors: use its manifest
    if run_dir is None or not os.path.isfile(os.path.join(run_dir, MANIFEST)):
        from .checkpoints import load_checkpoint

        if not os.path.exists(path):
            raise NFTError(f"no such file or directory: {path}")
        return load_checkpoint(path, device=device, **{k: v for k, v in spec.items() if v is not None})
    manifest = read_manifest(run_dir)
    check_manifest(manifest, os.path.join(run_dir, MANIFEST))
    _check_spec(manifest, spec, run_dir)
    wpath = os.path.join(run_dir, manifest.get("weights", WEIGHTS))
    if not os.path.isfile(wpath):
        raise NFTError(f"{run_dir} has a manifest but no {os.path.basename(wpath)} (incomplete run directory?)")
    if verify and manifest.get("sha256") and sha256_file(wpath) != manifest["sha256"]:
        raise NFTError(f"{wpath} does not match the sha256 in its manifest (modified or truncated)")
    model = model_from_manifest(manifest, os.path.join(run_dir, MANIFEST))
    load_state(model, load_safetensors(wpath), wpath)
    probe(model, manifest, wpath)
    return model.to(device), manifest


def _check_spec(manifest: dict, spec: dict, run_dir: str) -> None:
    """Flags given for a run directory must agree with its manifest."""
    for key in ("arch", "num_classes"):
        if spec.get(key) is not None and spec[key] != manifest[key]:
            raise NFTError(f"--{key.replace('_', '-')} {spec[key]} contradicts the manifest of {run_dir} "
                           f"({manifest[key]}); drop the flag")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    from .checkpoints import diff, mismatch_message

    own = model.state_dict()
    missing, unexpected, shape = diff(own, state)
    if missing or unexpected or shape:
        raise NFTError(mismatch_message(own, state, source))
    model.load_state_dict({**own, **state})


# -- output directories -------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class StagedDir:
    """Build a run directory under a temporary name and rename it into place on success, so an
    interrupted command leaves either nothing or a complete directory.

        with StagedDir(out, overwrite) as tmp:
            save_model(..., tmp, ...)

    The temporary directory is a hidden sibling ``.<name>.tmp-<pid>-*``; one left by a killed process
    (SIGKILL cannot be caught) is removed by the next StagedDir for the same path.
    """

    def __init__(self, path: str, overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        if os.path.lexists(self.path) and not overwrite:
            raise NFTError(f"output directory {path} exists; pass --overwrite to replace it")
        self.tmp = None

    @property
    def _prefix(self) -> str:
        return f".{os.path.basename(self.path)}.tmp-"

    def _remove_stale(self, parent: str) -> None:
        try:
            entries = os.listdir(parent)
        except OSError:
            return
        for name in entries:
            if name.startswith(self._prefix):
                pid = name[len(self._prefix):].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            self._remove_stale(parent)
            self.tmp = tempfile.mkdtemp(dir=parent, prefix=f"{self._prefix}{os.getpid()}-")
            os.chmod(self.tmp, 0o777 & ~_umask())
        except OSError as e:
            raise write_error(self.path, e) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        try:
            _fsync_tree(self.tmp)
            if os.path.lexists(self.path):
                old = self.tmp + ".old"
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            _fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise write_error(self.path, e) from None
        if old:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                _silent_remove(old)
        return False


def _fsync_tree(root: str) -> None:
    for d, _, _ in os.walk(root):
        _fsync_dir(d)
