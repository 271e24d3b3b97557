"""nft bench: the attack x defense x seed x clean-size grid, one JSON record per cell (resumable).

    nft bench --dataset mnist10k --model preactresnet18 --width 16 --attacks badnets,blend \\
        --defenses nft:default,nft:paper,ft --seeds 0,1,2 --clean-per-class 50,1,5,10 --out results/
    nft bench --rerun results/records/<cell>.json     # reproduce one cell from its record
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile

from ..errors import NFTError
from ..records import ModelSpec, read_record


def _ints(s: str, what: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise NFTError(f"{what} takes comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse_scoped_sets(items: list[str]) -> dict[str, dict]:
    """['nft.steps=50', 'badnets.alpha=0.6'] -> {'nft': {'steps': 50}, 'badnets': {'alpha': 0.6}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        scope, dot, name = key.rpartition(".")
        if not eq or not dot or not scope or not name:
            raise NFTError(f"--set takes SCOPE.KEY=VALUE (e.g. nft.steps=200, badnets.alpha=0.6), got {item!r}")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        out.setdefault(scope.strip().lower(), {})[name.strip().replace("-", "_")] = v
    return out


def add_parser(sub):
    p = sub.add_parser("bench", help="run an attack x defense x seed grid; one record per cell (resumable)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--dataset", default="mnist10k")
    g.add_argument("--model", default="preactresnet18", help="a registered model or torchvision:NAME")
    g.add_argument("--width", type=int, default=None, help="channel width (PreActResNet-18: 64 full, 16 on CPU)")
    g.add_argument("--attacks", default="badnets", help="comma-separated attacks (Benign is added)")
    g.add_argument("--no-benign", action="store_true", help="leave out the Benign (no attack) row")
    g.add_argument("--defenses", default="nft:default",
                   help="comma-separated defenses, NAME or NAME:VARIANT (VARIANT sets the defense's "
                        "'recipe', e.g. nft:default, nft:paper)")
    g.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    g.add_argument("--clean-per-class", default="50",
                   help="comma-separated clean images per class; the first is the main table's, e.g. 50,1,5,10")
    g.add_argument("--set", action="append", default=[], metavar="SCOPE.KEY=VALUE",
                   help="override an attack's or defense's setting (JSON value): nft.steps=200, "
                        "nft:paper.lr=0.01, badnets.alpha=0.6")
    t = p.add_argument_group("training of the backdoored models")
    t.add_argument("--poison-rate", type=float, default=0.1)
    t.add_argument("--target", type=int, default=0)
    t.add_argument("--label-mode", default="all2one", choices=["all2one", "all2all"])
    t.add_argument("--epochs", type=float, default=8)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--subset-train", type=int, default=None, help="train on a fixed random subset (quick runs)")
    t.add_argument("--subset-test", type=int, default=None, help="evaluate on a fixed random subset")
    r = p.add_argument_group("running")
    r.add_argument("--out", default=None, help="results directory (records/, models/, artifacts/)")
    r.add_argument("--jobs", type=int, default=1,
                   help="cells in parallel on this machine (default 1); each cell runs in a fresh process")
    r.add_argument("--inline", action="store_true",
                   help="run the cells one by one in this process (quick runs, debugging; CPU peak memory is "
                        "then relative to what earlier cells left allocated)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="spread cells with Ray: alone, a local instance; or a cluster address ('auto', "
                        "'ray://host:10001'); --out must then be on a filesystem every node sees")
    r.add_argument("--save-purified", default="tsne", choices=["tsne", "all", "none"],
                   help="keep purified models: for the cells the report's t-SNE uses (first seed, first clean "
                        "size; default), for all cells, or none")
    r.add_argument("--dry-run", action="store_true", help="list the cells and what is already recorded")
    r.add_argument("--rerun", default=None, metavar="RECORD.json",
                   help="re-run one cell from its record's config (fresh model) and compare ACC/ASR")
    r.add_argument("--tolerance", type=float, default=1.0, help="--rerun: allowed |difference| in points")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    r.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads per cell (default 1)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _opts(args):
    from ..bench import RunOptions
    from ..runtime import Runtime

    device = Runtime(device=args.device).device  # resolves 'auto'
    return RunOptions(device=device, threads=args.threads, progress=not args.no_progress)


def run(args) -> int:
    if args.rerun:
        return _rerun(args)
    if not args.out:
        raise NFTError("--out is required (the results directory)")
    from ..grid import expand_grid, run_grid
    from ..records import has_record

    base = ModelSpec(dataset=args.dataset, arch=args.model, arch_kwargs={"width": args.width} if args.width else {},
                     target=args.target, label_mode=args.label_mode, poison_rate=args.poison_rate,
                     epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, subset_train=args.subset_train,
                     subset_test=args.subset_test, precision=args.precision)
    if args.jobs < 1:
        raise NFTError("--jobs must be >= 1")
    models, cells, save_ids = expand_grid(base, _names(args.attacks), _names(args.defenses),
                                          _ints(args.seeds, "--seeds"), _ints(args.clean_per_class,
                                                                              "--clean-per-class"),
                                          parse_scoped_sets(args.set), benign=not args.no_benign)
    if args.save_purified == "all":
        save_ids = {c.cell_id for c in cells}
    elif args.save_purified == "none":
        save_ids = set()
    if args.dry_run:
        from ..records import NO_DEFENSE, CellSpec

        for c in [CellSpec(model=m, defense=NO_DEFENSE, clean_per_class=None) for m in models] + cells:
            print(("done " if has_record(args.out, c.cell_id) else "todo ") + c.cell_id)
        return 0
    print(f"nft bench: {len(models)} model(s), {len(models) + len(cells)} cell(s) -> {args.out}", flush=True)
    counts = run_grid(args.out, models, cells, save_ids, _opts(args), args.jobs, args.ray,
                      command=list(sys.argv),
                      log=lambda s: print(s, flush=True), inline=args.inline)
    print(f"nft bench: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    return 1 if counts["failed"] else 0


def _rerun(args) -> int:
    from ..bench import rerun

    record = read_record(args.rerun)
    work = args.out or tempfile.mkdtemp(prefix="nft-rerun-")
    try:
        res = rerun(record, _opts(args), work, args.tolerance)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        from ..records import write_record

        write_record(args.out, res["record"])
    res.pop("record")
    print(json.dumps(res, default=float))
    if not res["within_tolerance"]:
        print(f"nft bench: re-run differs from the record by more than {args.tolerance} point(s)", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_parser", "run", "parse_scoped_sets"]
