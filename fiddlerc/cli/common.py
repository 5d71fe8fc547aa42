"""What the fiddlerc command's parts share: exit codes, and Ctrl-C remembered as well as raised."""

from __future__ import annotations

import threading

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Ctrl-C raises KeyboardInterrupt, as by default, and is also remembered: an exception raised while Python
# runs a finalizer or a weakref callback is printed and dropped, so a generation loop also checks the flag at
# each token (seen once in some ten runs of the test suite: a run that went on generating after Ctrl-C).
interrupted = threading.Event()


def on_sigint(signum, frame) -> None:
    """The SIGINT handler `main` installs."""
    interrupted.set()
    raise KeyboardInterrupt
