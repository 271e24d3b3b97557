"""``nft demo | train | purify | eval``: thin argument parsing over the library.

Every user error (NFTError) becomes one line on stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import NFTError

COMMANDS = ["demo", "train", "purify", "evaluate", "bench", "report"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from . import __version__

    p = argparse.ArgumentParser(prog="nft", description="Neural mask Fine-Tuning backdoor purification toolkit")
    p.add_argument("--version", action="version", version=f"nft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f".commands.{name}", __package__)
        mod.add_parser(sub).set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args._run(args)
    except NFTError as e:
        print(f"nft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
