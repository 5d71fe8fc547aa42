"""write_atomic: the new text or the old, never half of either."""

import pytest

from fiddlerc.files import write_atomic


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "plan.json"
    write_atomic(path, "one\n")
    write_atomic(path, "two\n")
    assert path.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "plan.json"
    write_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "\udc80")  # a lone surrogate cannot be written as UTF-8
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
