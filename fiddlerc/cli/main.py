"""The `fiddlerc` command's entry point: its parser, built from each part's commands, and `main`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from fiddlerc.cli import compiling, measuring, serving, text
from fiddlerc.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, interrupted, on_sigint
from fiddlerc.version import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fiddlerc", description="Compile Mixture-of-Experts models to run with experts split between GPU and CPU."
    )
    p.add_argument("--version", action="version", version=f"fiddlerc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = p.add_subparsers(dest="command", required=True)

    compiling.add_commands(sub)
    measuring.add_commands(sub)
    text.add_commands(sub)
    serving.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from fiddlerc.errors import FiddlerError

    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars (its tqdm reads this)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="fiddlerc: %(message)s")
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    interrupted.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        return args.func(args)
    except FiddlerError as e:
        print(f"fiddlerc: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fiddlerc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
