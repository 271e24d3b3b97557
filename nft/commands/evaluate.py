"""nft eval: ACC, and ASR/RA when the run directory records an attack."""
from __future__ import annotations

import json

from ..evaluate import evaluate
from ..io import load_model
from ..runs import attack_from_run, dataset_of
from .common import add_runtime_args, runtime_from


def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a run directory: ACC, ASR, RA")
    p.add_argument("model", help="a run directory")
    p.add_argument("--data-root", default=None)
    add_runtime_args(p)
    return p


def run(args) -> int:
    rt = runtime_from(args)
    model, manifest = load_model(args.model, rt.device)
    data = dataset_of(manifest, args.data_root)
    attack = attack_from_run(args.model, manifest)
    print(json.dumps(evaluate(model, data.test, attack, rt)))
    return 0
