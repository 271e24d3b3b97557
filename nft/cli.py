"""``nft demo | train | purify | eval``: thin argument parsing over the library.

Every failure is one line on stderr, never a traceback:

    exit 2    ``nft: error: ...``          bad input: arguments, files, data, a full disk
    exit 130  ``nft: interrupted``         Ctrl-C (143 for SIGTERM); no partial output is left
    exit 1    ``nft: internal error: ...`` a bug in nft; NFT_DEBUG=1 shows the traceback
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .errors import NFTError

COMMANDS = ["demo", "train", "purify", "evaluate", "bench", "report", "show_attack"]


class Parser(argparse.ArgumentParser):
    """argparse that raises NFTError instead of printing usage and exiting, so errors stay one line."""

    def error(self, message):
        raise NFTError(f"{message} (see '{self.prog} --help')")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that staged outputs are cleaned up like on Ctrl-C."""


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from . import __version__

    p = Parser(prog="nft", description="Neural mask Fine-Tuning backdoor purification toolkit")
    p.add_argument("--version", action="version", version=f"nft {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f".commands.{name}", __package__)
        mod.add_parser(sub).set_defaults(_run=mod.run)
    return p


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        args = build_parser().parse_args(argv)
        return args._run(args) or 0
    except NFTError as e:
        print(f"nft: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("nft: terminated (no partial output was left)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("nft: interrupted (no partial output was left)", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help and --version exit 0 through argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except MemoryError:
        print("nft: error: out of memory; use a smaller model, batch (--set batch_size=N) or clean set", file=sys.stderr)
        return 2
    except OSError as e:  # the file system: permission denied, disk full, a vanished file
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"nft: error: {one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("NFT_DEBUG"):
            raise
        if "out of memory" in str(e).lower():
            print("nft: error: out of memory on the device; lower --set batch_size=N or use --device cpu", file=sys.stderr)
            return 2
        print(f"nft: internal error: {type(e).__name__}: {one_line(e)[:300]} "
              f"(a bug in nft; rerun with NFT_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
