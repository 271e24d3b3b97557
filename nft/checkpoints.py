"""Foreign checkpoints: read ``.pt``/``.pth``/``.safetensors`` files without running their code, find
the state_dict inside, and fit it to a model built from ``--arch/--num-classes/--normalize``.

Reading never unpickles code: safetensors files are plain tensors, and everything else goes through
``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain containers. A file
that needs anything more (a pickled model object, numpy arrays, a dataset) is refused, with a message
saying how to convert it in an environment you trust.

Formats understood (the state_dict may sit at the top or under one of ``STATE_KEYS``)::

    plain state_dict              torch.save(model.state_dict())
    {'state_dict': ...}           Lightning and many research repos
    {'model': ...}                BackdoorBench attack_result.pt (its 'model' entry), DeiT, ...
    {'netC': ...}                 the NFT seed and Input-aware Dynamic attack checkpoints
    {'net': ...}                  I-BAU
    'module.' prefixes            models saved from DataParallel / DistributedDataParallel
    this toolkit's own keys       'normalize.mean', 'normalize.std', 'net.*'

Parameter names are the architecture's own: BackdoorBench's PreActResNet-18 names are those of our
``preactresnet18``; torchvision checkpoints load into ``torchvision:NAME``.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings

import torch
import torch.nn as nn

from .errors import NFTError

STATE_KEYS = ("state_dict", "model_state_dict", "model", "netC", "net", "module")
SAFETENSORS_SUFFIXES = (".safetensors", ".st")

# name -> (mean, std, input shape). The shape is the dataset's usual one; override with --input-shape.
NORMALIZE_PRESETS: dict[str, tuple[tuple, tuple, tuple | None]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), (3, 32, 32)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), (3, 32, 32)),
    "gtsrb": ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), (3, 32, 32)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), (3, 32, 32)),
    "mnist": ((0.1307,), (0.3081,), (1, 28, 28)),
    "mnist10k": ((0.1307,), (0.3081,), (1, 28, 28)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (3, 224, 224)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (3, 64, 64)),
    "none": ((0.0,), (1.0,), None),  # the model takes raw [0, 1] pixels
}

CONVERT_HINT = ("if you trust the file, convert it in an environment you trust: obj = torch.load(path, "
                "weights_only=False), then torch.save(model.state_dict(), 'weights.pt') or "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), and load that")


# -- reading --------------------------------------------------------------------------------------
def _is_safetensors(path: str) -> bool:
    """safetensors starts with an 8-byte little-endian header length and then a JSON object."""
    if path.endswith(SAFETENSORS_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 31)


def read_tensors(path: str):
    """The object stored in ``path`` (a safetensors file or a torch checkpoint), loaded without
    unpickling code. Returns (object, format name)."""
    if os.path.isdir(path):
        raise NFTError(f"{path} is a directory without manifest.json; pass a run directory or a checkpoint file")
    if not os.path.isfile(path):
        raise NFTError(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise NFTError(f"{path} is empty")
    if _is_safetensors(path):
        from .io import load_safetensors

        return load_safetensors(path), "safetensors"
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; we report instead
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise NFTError(_refusal(path, str(e))) from None
    except MemoryError:
        raise NFTError(f"{path} is too large to load into memory") from None
    except Exception as e:  # truncated zip, bad magic number, garbage bytes: torch raises many types
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise NFTError(f"{path} is not a readable PyTorch or safetensors checkpoint "
                       f"(corrupt or truncated? {type(e).__name__}: {first})") from None
    return obj, "torch (weights_only)"


def _refusal(path: str, message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        why = f"it needs code to be unpickled ({m.group(1)}), and unpickling code can run anything"
    else:
        op = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", message)
        why = "it is a pickle that torch.load(weights_only=True) cannot read safely" + (f" ({op.group(0)})" if op else "")
    return f"refusing to load {path}: {why}. {CONVERT_HINT[0].upper()}{CONVERT_HINT[1:]}"


# -- finding the state_dict -----------------------------------------------------------------------
def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def find_state_dict(obj, path: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict inside a loaded checkpoint, and where it was found (e.g. "['netC']")."""
    where = ""
    for _ in range(4):  # a few levels of nesting at most
        if _is_state_dict(obj):
            return dict(obj), where or "top level"
        if not isinstance(obj, dict):
            break
        key = next((k for k in STATE_KEYS if k in obj), None)
        if key is None:
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors and len(tensors) >= len(obj) / 2:  # a state_dict with a few bookkeeping entries
                return tensors, (where or "top level") + " (tensor entries)"
            break
        obj, where = obj[key], where + f"[{key!r}]"
    keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise NFTError(f"found no state_dict in {path} (looked for a dict of tensors at the top or under "
                   f"{list(STATE_KEYS)}; {'keys' if isinstance(obj, dict) else 'got'} {keys})")


def _strip(state: dict, prefix: str) -> dict | None:
    if all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return None


def candidates(state: dict[str, torch.Tensor]) -> list[tuple[str, dict, str]]:
    """Ways to read ``state``: (description, renamed state, 'model' or 'net' as the target)."""
    out = []
    for prefix in ("", "module.", "model.", "_orig_mod."):
        s = _strip(state, prefix) if prefix else state
        if s is None:
            continue
        desc = f"without the {prefix!r} prefix" if prefix else "as saved"
        if any(k.startswith("normalize.") for k in s):
            out.append((desc, s, "model"))
        else:
            out.append((desc, s, "net"))
    return out


# -- fitting --------------------------------------------------------------------------------------
def diff(own: dict, state: dict) -> tuple[list, list, list]:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against the model's ``own``."""
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    return missing, unexpected, shape


def mismatch_message(own: dict, state: dict, source: str, prefix: str = "") -> str:
    missing, unexpected, shape = diff(own, state)
    parts = []
    if shape:
        k = shape[0]
        parts.append(f"{prefix}{k} is {tuple(state[k].shape)} in {source} but {tuple(own[k].shape)} in the model")
    if missing:
        parts.append(f"missing keys {[prefix + k for k in missing[:3]]}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else ""))
    if unexpected:
        parts.append(f"unexpected keys {[prefix + k for k in unexpected[:3]]}"
                     + (f" (+{len(unexpected) - 3})" if len(unexpected) > 3 else ""))
    hint = _hint(own, state)
    return f"{source} does not fit the architecture: " + "; ".join(parts) + (f" ({hint})" if hint else "")


def _hint(own: dict, state: dict) -> str:
    """A guess at the flag that would make it fit: the head's class count, the first conv's channels."""
    heads = [k for k in own if k.endswith(".weight") and own[k].dim() == 2]
    if heads and heads[-1] in state and state[heads[-1]].dim() == 2:
        n, m = state[heads[-1]].shape[0], own[heads[-1]].shape[0]
        if n != m and state[heads[-1]].shape[1] == own[heads[-1]].shape[1]:
            return f"the checkpoint's head has {n} outputs: try --num-classes {n}"
    convs = [k for k in own if k.endswith(".weight") and own[k].dim() == 4]
    if convs and convs[0] in state and state[convs[0]].dim() == 4:
        (o, i), (mo, mi) = state[convs[0]].shape[:2], own[convs[0]].shape[:2]
        if i != mi:
            return f"the checkpoint's first conv takes {i} input channels: check --input-shape/--normalize"
        if o != mo:
            return f"the checkpoint's first conv has {o} output channels: check --width"
    return ""


def _check_tensors(state: dict, source: str) -> None:
    for k, v in state.items():
        if v.layout != torch.strided or v.is_quantized or v.is_complex():
            raise NFTError(f"{source}: tensor {k} is {v.layout}/{v.dtype}; only dense real tensors are supported")


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """Load ``state`` into ``model`` (a Classifier: the whole model or its ``net``), trying each
    reading in :func:`candidates`. Returns the reading used; raises NFTError naming the first
    mismatched keys of the closest reading."""
    _check_tensors(state, source)
    best = None
    for desc, s, target in candidates(state):
        module = model if target == "model" or not hasattr(model, "net") else model.net
        own = module.state_dict()
        missing, unexpected, shape = diff(own, s)
        if not (missing or unexpected or shape):
            s = {**{k: v for k, v in own.items() if k not in s}, **s}  # num_batches_tracked absent in old files
            module.load_state_dict(s)
            return desc + ("" if module is model else ", into model.net")
        score = len(missing) + len(unexpected) + 2 * len(shape)
        if best is None or score < best[0]:
            best = (score, own, s, "net." if module is not model else "")
    _, own, s, prefix = best
    raise NFTError(mismatch_message(own, s, source, prefix))


def parse_normalize(text: str) -> tuple[tuple, tuple, tuple | None]:
    """``--normalize``: a preset name (cifar10, mnist, imagenet, none, ...) or MEAN/STD as
    comma-separated numbers, e.g. ``0.5,0.5,0.5/0.25,0.25,0.25``. Returns (mean, std, input shape or None)."""
    key = text.strip().lower()
    if key in NORMALIZE_PRESETS:
        return NORMALIZE_PRESETS[key]
    if "/" in key:
        try:
            mean, std = (tuple(float(v) for v in part.split(",")) for part in key.split("/", 1))
        except ValueError:
            mean = std = ()
        if mean and len(mean) == len(std) and all(s > 0 and s < float("inf") for s in std) \
                and all(abs(m) < float("inf") for m in mean):
            return mean, std, None
    import difflib

    close = difflib.get_close_matches(key, list(NORMALIZE_PRESETS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise NFTError(f"--normalize {text!r} is neither a preset ({', '.join(NORMALIZE_PRESETS)}) nor MEAN/STD "
                   f"like 0.5,0.5,0.5/0.25,0.25,0.25 with positive std; {hint}".rstrip("; "))


def parse_input_shape(text) -> tuple[int, int, int]:
    """``--input-shape C,H,W`` (also accepts CxHxW or a sequence)."""
    try:
        parts = [int(v) for v in re.split(r"[,x ]+", text.strip())] if isinstance(text, str) else [int(v) for v in text]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 3 or not all(0 < v <= 65536 for v in parts) or parts[0] > 64:
        raise NFTError(f"--input-shape must be C,H,W with positive sizes (e.g. 3,32,32), got {text!r}")
    return tuple(parts)


def _carried_normalization(state: dict) -> tuple[list, list] | None:
    for _, s, target in candidates(state):
        if target == "model" and "normalize.mean" in s and "normalize.std" in s:
            return s["normalize.mean"].flatten().tolist(), s["normalize.std"].flatten().tolist()
    return None


def load_checkpoint(path: str, arch: str | None = None, num_classes: int | None = None, normalize: str | None = None,
                    input_shape=None, arch_kwargs: dict | None = None, device="cpu") -> tuple[nn.Module, dict]:
    """Build ``arch`` and load a foreign checkpoint into it. Returns (model, manifest) like ``io.load_model``;
    the manifest records where the weights came from (path, sha256, format, the reading used)."""
    from .io import model_from_manifest, probe, sha256_file

    obj, fmt = read_tensors(path)
    state, where = find_state_dict(obj, path)
    if not arch or num_classes is None:
        raise NFTError(f"{path} has no manifest.json: say what it is with --arch NAME --num-classes N "
                       f"--normalize DATASET|none|MEAN/STD (e.g. --arch preactresnet18 --num-classes 10 --normalize cifar10)")
    carried = _carried_normalization(state)
    if normalize is None and carried is None:
        raise NFTError(f"{path} does not say how its inputs were normalized: pass --normalize "
                       f"(a dataset name such as cifar10, 'none' for raw [0, 1] pixels, or MEAN/STD)")
    mean, std, preset_shape = parse_normalize(normalize) if normalize is not None else (*carried, None)
    shape = parse_input_shape(input_shape) if input_shape is not None else preset_shape
    if shape is None:
        raise NFTError(f"pass --input-shape C,H,W for {path} (e.g. 3,32,32); --normalize {normalize} does not imply one")
    c = shape[0]
    if normalize is not None and normalize.strip().lower() == "none":
        mean, std = (0.0,) * c, (1.0,) * c
    if len(mean) != c or len(std) != c:
        raise NFTError(f"the normalization has {len(mean)} channel(s) but the input shape {shape} has {c}")
    if carried is not None and normalize is not None and \
            not torch.allclose(torch.tensor(carried[0] + carried[1]), torch.tensor(list(mean) + list(std)), atol=1e-4):
        raise NFTError(f"{path} carries its own normalization (mean {carried[0]}, std {carried[1]}), "
                       f"which differs from --normalize {normalize}; drop --normalize to use the checkpoint's")
    manifest = {"arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "num_classes": num_classes,
                "input_shape": list(shape), "mean": list(mean), "std": list(std), "dataset": None, "attack": None}
    model = model_from_manifest(manifest)
    reading = fit_state(model, state, path)
    probe(model, manifest, path)
    manifest["source"] = {"path": os.path.abspath(path), "sha256": sha256_file(path), "format": fmt,
                          "state_dict": where, "reading": reading}
    return model.to(device), manifest
