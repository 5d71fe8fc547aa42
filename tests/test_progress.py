"""Progress bars: on a terminal only, the items passed through unchanged."""

import io
import sys

from fiddlerc import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal_and_nowhere_else(monkeypatch):
    monkeypatch.delenv("FIDDLERC_NO_PROGRESS", raising=False)
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(progress.progress(range(3), "counting")) == [0, 1, 2]
    assert pipe.getvalue() == ""  # a pipe or a log: no bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress.progress(iter(range(3)), "counting", total=3)) == [0, 1, 2]
    assert "counting" in terminal.getvalue() and "/3 [" in terminal.getvalue()  # tqdm throttles its redraws
    monkeypatch.setenv("FIDDLERC_NO_PROGRESS", "1")
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert list(progress.progress(range(2), "counting")) == [0, 1] and quiet.getvalue() == ""
