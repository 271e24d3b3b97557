"""nft purify: run a defense (NFT by default) on a model and save the purified model."""
from __future__ import annotations

import json
import os
import shutil

from ..defenses import get_defense
from ..errors import NFTError
from ..evaluate import evaluate, poisoned_test_set
from ..io import StagedDir, atomic_save_safetensors, atomic_write_json, load_model, save_model
from ..metrics import der
from ..profile import measure
from ..purify import RECIPES
from ..registry import DEFENSES
from ..runs import attack_from_run, clean_set, dataset_of
from .common import add_clean_args, add_runtime_args, check_shape, load_clean_npz, runtime_from


def add_parser(sub):
    p = sub.add_parser("purify", help="remove a backdoor from a model (NFT or a baseline defense)")
    p.add_argument("model", help="a run directory (model.safetensors + manifest.json)")
    p.add_argument("--defense", default="nft", help=f"one of {DEFENSES.names()}")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="NFT recipe")
    p.add_argument("--steps", type=int, default=None, help="NFT optimizer steps (recipe default otherwise)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a defense setting (JSON value), e.g. --set lr=0.1")
    p.add_argument("--eval", action="store_true",
                   help="evaluate ACC/ASR/RA before, along and after (needs the run's dataset and attack)")
    p.add_argument("--out", required=True, help="directory for the purified model")
    p.add_argument("--overwrite", action="store_true")
    add_clean_args(p)
    add_runtime_args(p)
    return p


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise NFTError(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


def run(args) -> int:
    rt = runtime_from(args)
    defend = get_defense(args.defense)
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise NFTError("--out must differ from the input model directory (the input is never overwritten)")
    staged = StagedDir(args.out, args.overwrite)
    model, manifest = load_model(args.model, rt.device)
    cfg = parse_sets(args.set)
    if args.defense == "nft":
        cfg = {"recipe": args.recipe, "steps": args.steps, **cfg}
    data = None
    if args.clean_npz:
        pool = load_clean_npz(args.clean_npz)
        check_shape(pool.x.shape, manifest, "clean images")
        augment = manifest.get("augment", "crop_flip")
    else:
        data = dataset_of(manifest, args.data_root)
        pool, augment = data.heldout, data.augment
    clean = clean_set(pool, manifest["num_classes"], augment, args.per_class, args.fraction, args.clean_seed)

    monitor, before, poisoned, attack = None, None, None, None
    if args.eval:
        data = data or dataset_of(manifest, args.data_root)
        attack = attack_from_run(args.model, manifest)
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
    new_manifest = {k: v for k, v in manifest.items() if k not in ("sha256", "weights", "code_version")}
    new_manifest["purified"] = {"defense": args.defense, "config": extras.get("config", cfg), "source": args.model,
                                "source_sha256": manifest.get("sha256"), "clean_images": len(clean),
                                "seconds": cost.seconds, "peak_mb": cost.peak_mb}
    with staged as tmp:
        src_attack = os.path.join(args.model, "attack.safetensors")
        if os.path.isfile(src_attack):
            shutil.copyfile(src_attack, os.path.join(tmp, "attack.safetensors"))
        if mask_state:
            atomic_save_safetensors(mask_state, os.path.join(tmp, "masks.safetensors"))
        atomic_write_json({"history": result.history, "extras": extras}, os.path.join(tmp, "history.json"))
        atomic_write_json(summary, os.path.join(tmp, "metrics.json"))
        save_model(result.model, tmp, new_manifest)
    print(json.dumps({"out": args.out, **summary}, default=float))
    return 0
