"""nft eval: ACC, and ASR/RA when the run directory records an attack."""
from __future__ import annotations

import json
import os

from ..errors import NFTError
from ..evaluate import evaluate
from ..runs import attack_from_run, dataset_of
from .common import add_model_args, add_runtime_args, check_shape, load_model_arg, runtime_from


def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a model: ACC, ASR, RA")
    p.add_argument("model", help="a run directory, or a .pt/.pth/.safetensors file with --arch, --num-classes, "
                                 "--normalize and --dataset")
    p.add_argument("--dataset", default=None, help="the test set, when the manifest names none (or no manifest)")
    p.add_argument("--data-root", default=None)
    add_model_args(p)
    add_runtime_args(p)
    return p


def run(args) -> int:
    rt = runtime_from(args)
    model, manifest = load_model_arg(args, rt.device)
    if args.dataset:
        manifest = dict(manifest, dataset=args.dataset)
    data = dataset_of(manifest, args.data_root)
    check_shape(data.test.x.shape, manifest, f"{data.name} test images")
    if data.num_classes != manifest["num_classes"]:
        raise NFTError(f"{data.name} has {data.num_classes} classes but the model has {manifest['num_classes']}")
    attack = attack_from_run(args.model, manifest) if os.path.isdir(args.model) else None
    print(json.dumps(evaluate(model, data.test, attack, rt)))
    return 0
