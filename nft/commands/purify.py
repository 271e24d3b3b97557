"""nft purify: run a defense (NFT by default) on a model and save the purified model.

The input (a run directory or a foreign checkpoint file) is only read. The output directory is built
under a temporary name and renamed into place at the end, so a crash or a kill leaves no partial
result. A loss that turns NaN/inf stops NFT: the last good masks are saved, and the command says so
and exits 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from ..defenses import get_defense
from ..errors import NFTError
from ..evaluate import evaluate, poisoned_test_set
from ..io import StagedDir, atomic_copy, atomic_save_safetensors, atomic_write_json, save_model
from ..masks import find_sites
from ..metrics import der
from ..profile import measure
from ..purify import RECIPES, NFTConfig, recipe
from ..registry import DEFENSES
from ..runs import attack_from_run, clean_set, dataset_of
from .common import (add_clean_args, add_model_args, add_runtime_args, check_out, check_shape, load_clean_npz,
                     load_model_arg, positive_int, runtime_from)


def add_parser(sub):
    p = sub.add_parser("purify", help="remove a backdoor from a model (NFT or a baseline defense)")
    p.add_argument("model", help="a run directory (model.safetensors + manifest.json), or a .pt/.pth/.safetensors "
                                 "file with --arch, --num-classes and --normalize")
    p.add_argument("--defense", default="nft", help=f"one of {DEFENSES.names()}")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="NFT recipe")
    p.add_argument("--steps", type=positive_int, default=None, help="NFT optimizer steps (recipe default otherwise)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a defense setting (JSON value), e.g. --set lr=0.1")
    p.add_argument("--eval", action="store_true",
                   help="evaluate ACC/ASR/RA before, along and after (needs the run's dataset and attack)")
    p.add_argument("--dataset", default=None, help="the model's dataset, when its manifest names none (or no manifest)")
    p.add_argument("--out", required=True, help="directory for the purified model")
    p.add_argument("--overwrite", action="store_true")
    add_model_args(p)
    add_clean_args(p)
    add_runtime_args(p)
    return p


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise NFTError(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            out[k.strip().replace("-", "_")] = v
    return out


_AT_LEAST_ONE = ("steps", "batch_size", "log_every")


def _typed(name: str, value, default, annotation: str):
    """Check one --set value against the dataclass field's declared type; returns the value to use."""
    def bad(kind):
        return NFTError(f"--set {name}={json.dumps(value)}: expected {kind}")

    if isinstance(default, bool) or annotation == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int) or annotation == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        if value < (1 if name in _AT_LEAST_ONE else 0):
            raise bad(f"an integer >= {1 if name in _AT_LEAST_ONE else 0}")
        return value
    if isinstance(default, float) or annotation == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise bad("a finite number >= 0")
        return float(value)
    if isinstance(default, tuple):
        if not (isinstance(value, list) and len(value) == len(default)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                        for v in value)):
            raise bad(f"a list of {len(default)} finite numbers >= 0")
        return tuple(value)
    if isinstance(default, str) or "str" in annotation:
        if not (isinstance(value, str) or (value is None and "None" in annotation)):
            raise bad("a string")
        return value
    return value


def nft_config(args, sets: dict) -> NFTConfig:
    """The NFT config from --recipe, --steps and --set, with every value type- and range-checked."""
    defaults = {f.name: f for f in dataclasses.fields(NFTConfig)}
    unknown = sorted(set(sets) - set(defaults))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(defaults), n=1)
        raise NFTError(f"unknown NFT setting {unknown[0]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                       + f" (settings: {', '.join(sorted(defaults))})")
    base = NFTConfig()
    typed = {k: _typed(k, v, getattr(base, k), str(defaults[k].type)) for k, v in sets.items()}
    if args.steps is not None and typed.get("steps") not in (None, args.steps):
        raise NFTError(f"--steps {args.steps} and --set steps={typed['steps']} disagree; give one")
    typed["steps"] = args.steps if args.steps is not None else typed.get("steps")
    cfg = recipe(typed.pop("recipe", args.recipe), **typed)
    from ..augment import train_transform

    if cfg.augment is not None:
        try:
            train_transform(cfg.augment)
        except ValueError as e:
            raise NFTError(f"--set augment: {e}") from None
    return cfg


def run(args) -> int:
    rt = runtime_from(args)
    defend = get_defense(args.defense)
    sets = parse_sets(args.set)
    cfg = nft_config(args, sets) if args.defense == "nft" else sets
    check_out(args.out, args.model, args.clean_npz)
    staged = StagedDir(args.out, args.overwrite)  # refuse an existing directory before any work
    model, manifest = load_model_arg(args, rt.device)
    if args.defense == "nft" and not find_sites(model, cfg.where):
        raise NFTError(f"{args.model} has no maskable layer for --set where={cfg.where} (no norm layer"
                       + (", conv or linear besides the head)" if cfg.where == "auto" else "; try --set where=auto)"))
    if args.dataset:
        manifest = dict(manifest, dataset=args.dataset)
    data = None
    if args.clean_npz:
        pool = load_clean_npz(args.clean_npz, manifest["num_classes"], manifest["input_shape"])
        check_shape(pool.x.shape, manifest, "clean images")
        augment = manifest.get("augment") or _augment_for(manifest)
    else:
        data = dataset_of(manifest, args.data_root)
        check_shape(data.heldout.x.shape, manifest, f"{data.name} images")
        if data.num_classes != manifest["num_classes"]:
            raise NFTError(f"{data.name} has {data.num_classes} classes but the model has {manifest['num_classes']}")
        pool, augment = data.heldout, data.augment
    clean = clean_set(pool, manifest["num_classes"], augment, args.per_class, args.fraction, args.clean_seed)

    monitor, before, poisoned, attack = None, None, None, None
    if args.eval:
        data = data or dataset_of(manifest, args.data_root)
        attack = attack_from_run(args.model, manifest) if os.path.isdir(args.model) else None
        poisoned = poisoned_test_set(data.test, attack) if attack else None
        before = evaluate(model, data.test, runtime=rt, poisoned=poisoned)
        monitor = lambda m: evaluate(m, data.test, runtime=rt, poisoned=poisoned)  # noqa: E731
    with measure(rt.device) as cost:
        result = defend(model, clean, cfg, rt, monitor=monitor)
    summary = {"defense": args.defense, "seconds": cost.seconds, "peak_mb": cost.peak_mb, "clean_images": len(clean)}
    if args.eval:
        after = evaluate(result.model, data.test, runtime=rt, poisoned=poisoned)
        summary.update(before=before, after=after)
        if poisoned is not None:
            summary["der"] = der(before["acc"], before["asr"], after["acc"], after["asr"])
    extras = dict(result.extras)
    mask_state = extras.pop("mask_state", None)
    stopped = extras.get("stopped")
    probe = extras.get("composite_probe")
    if probe and probe.get("pairs"):  # say so: NFT changed its settings for this model
        summary["composite_probe"] = probe
    patches = extras.get("patch_probe")
    if patches and patches.get("flagged"):  # the same for a flagged patch window
        summary["patch_probe"] = patches
    config = extras.get("config", dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)
    new_manifest = {k: v for k, v in manifest.items() if k not in ("sha256", "weights", "code_version")}
    new_manifest["purified"] = {"defense": args.defense, "config": config, "source": os.path.abspath(args.model),
                                "source_sha256": manifest.get("sha256") or manifest.get("source", {}).get("sha256"),
                                "clean_images": len(clean), "seconds": cost.seconds, "peak_mb": cost.peak_mb,
                                "stopped": stopped}
    with staged as tmp:
        src_attack = os.path.join(args.model, "attack.safetensors")
        if os.path.isdir(args.model) and os.path.isfile(src_attack):
            atomic_copy(src_attack, os.path.join(tmp, "attack.safetensors"))
        if mask_state:
            atomic_save_safetensors(mask_state, os.path.join(tmp, "masks.safetensors"))
        atomic_write_json({"history": result.history, "extras": extras}, os.path.join(tmp, "history.json"))
        atomic_write_json(summary, os.path.join(tmp, "metrics.json"))
        save_model(result.model, tmp, new_manifest)  # the manifest is written last
    print(json.dumps({"out": args.out, **summary}, default=float))
    if stopped:
        raise NFTError(f"purification {stopped}; the purified model in {args.out} uses those masks "
                       f"(lower --set lr or check the clean data)")
    return 0


def _augment_for(manifest: dict) -> str:
    """The train-time augmentation for clean images when the manifest names none: flips are wrong for
    single-channel digits, so grey images get small shifts and colour images crop + flip."""
    return "shift" if manifest["input_shape"][0] == 1 else "crop_flip"
