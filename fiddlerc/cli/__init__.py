"""The `fiddlerc` command, a thin layer over the API: `main` (fiddlerc.cli.main) builds its parser from
the commands of each part: compiling (compile, report, plan, verify, architectures), measuring
(calibrate, popularity, bench) and text (run, chat, demo)."""

from fiddlerc.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
