"""write_atomic: the new text or the old, never half of either."""

import os

import pytest

from fiddlerc.errors import OptionError
from fiddlerc.files import output_file, write_atomic


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


def test_written_files_get_the_usual_permissions_not_a_temporary_files(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    write_atomic(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~old  # 0644 under the usual umask


def test_an_output_file_gets_its_folders_and_a_folder_is_refused(tmp_path):
    path = output_file(tmp_path / "new" / "deeper" / "t.json", "--trace")
    assert path.parent.is_dir() and not path.exists()
    with pytest.raises(OptionError, match=r"--output .* is a folder: give the name of a file"):
        output_file(tmp_path, "--output")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OptionError, match="cannot create the folder of --json"):
        output_file(tmp_path / "file" / "b.json", "--json")
