"""nft report: Table 1 (Markdown, CSV), plots and one HTML page from a bench results directory.

Reports are made from the records and the artifacts the bench saved; nothing is re-run.
"""
from __future__ import annotations

import json

from ..errors import NFTError


def add_parser(sub):
    p = sub.add_parser("report", help="tables, plots and an HTML page from `nft bench` records",
                       description=__doc__)
    p.add_argument("results", help="a results directory written by `nft bench` (holds records/)")
    p.add_argument("--out", default=None, help="output directory (default RESULTS/report)")
    p.add_argument("--clean-per-class", type=int, default=None,
                   help="clean-set size of the main table (default: the largest recorded)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--tsne-samples", type=int, default=600,
                   help="test images in each t-SNE (a fifth of them triggered); 0 turns the t-SNE off")
    return p


def run(args) -> int:
    from ..report import build_report

    if args.tsne_samples < 0:
        raise NFTError("--tsne-samples must be >= 0")
    paths = build_report(args.results, args.out, args.clean_per_class, plots=not args.no_plots,
                         tsne_samples=args.tsne_samples)
    with open(paths["markdown"]) as f:
        text = f.read()
    start = text.find("### Table 1")
    if start >= 0:
        print(text[start:text.find("\n\n", text.find("| Avg. Drop", start))])
    print(json.dumps({k: v for k, v in paths.items() if k != "figures"} | {"figures": len(paths["figures"])}))
    return 0
