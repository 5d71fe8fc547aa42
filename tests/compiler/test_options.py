"""Compile options parsed into the plan's target."""

import pytest

from fiddlerc.compiler.options import parse_target
from fiddlerc.errors import OptionError
from fiddlerc.units import parse_dtype


def test_options_validate():
    with pytest.raises(OptionError, match="--context"):
        parse_target(1, context=0)
    with pytest.raises(OptionError, match="unknown dtype"):
        parse_dtype("float8")
    with pytest.raises(OptionError, match="--fast-experts"):
        parse_target(1, fast_experts=-1)
