import pytest

from fiddlerc.compiler.options import parse_target
from fiddlerc.errors import OptionError
from fiddlerc.units import parse_dtype, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * 2**30),
        ("512MiB", 512 * 2**20),
        ("24GB", 24 * 10**9),
        ("1000", 1000),
        ("1.5GiB", 3 * 2**29),
        ("0", 0),
        ("2 kib", 2048),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-1", "1e99GiB", "lots", "24XB", "", "GiB", "1.5", "9" * 30 + "TiB"])
def test_parse_size_rejects(text):
    with pytest.raises(OptionError, match="invalid size"):
        parse_size(text)


def test_options_validate():
    with pytest.raises(OptionError, match="--context"):
        parse_target(1, context=0)
    with pytest.raises(OptionError, match="unknown dtype"):
        parse_dtype("float8")
    with pytest.raises(OptionError, match="--fast-experts"):
        parse_target(1, fast_experts=-1)
