"""The error types users see: one base class, which the CLI turns into one line and exit code 2."""

import pytest

import fiddlerc
from fiddlerc import errors
from fiddlerc.cli import common, compiling, main

KINDS = [errors.ModelFolderError, errors.UnsupportedModelError, errors.OptionError, errors.BudgetError,
         errors.PlanError, errors.ArtifactError]  # fmt: skip


def test_every_kind_is_a_fiddler_error_exported_by_the_package():
    assert fiddlerc.FiddlerError is errors.FiddlerError
    public = {v for k, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert public == {errors.FiddlerError, *KINDS}
    assert all(issubclass(k, errors.FiddlerError) and k.__doc__ for k in KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_the_cli_prints_a_user_error_on_one_line_and_exits_2(kind, monkeypatch, capsys):
    def fail(args):
        raise kind("the budget is too small: give at least 2 GiB")

    monkeypatch.setattr(compiling, "_cmd_architectures", fail)
    assert main(["architectures"]) == common.EXIT_USAGE == 2
    assert capsys.readouterr().err == "fiddlerc: error: the budget is too small: give at least 2 GiB\n"


def test_a_bug_is_not_dressed_up_as_a_user_error(monkeypatch):
    def fail(args):
        raise KeyError("internal")

    monkeypatch.setattr(compiling, "_cmd_architectures", fail)
    with pytest.raises(KeyError):
        main(["architectures"])
