"""Sizes and dtypes as users write them, parsed and printed."""

import pytest
import torch

from fiddlerc.errors import OptionError
from fiddlerc.units import DTYPES, dtype_name, format_size, parse_dtype, parse_size


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


def test_format_size_prints_binary_units_and_reads_back():
    assert [format_size(n) for n in (0, 1023, 1024, 3 * 2**29, 2**40, 5 * 2**50)] == [
        "0 B", "1023 B", "1.00 KiB", "1.50 GiB", "1.00 TiB", "5120.00 TiB"
    ]  # fmt: skip
    assert parse_size(format_size(24 * 2**30).replace(" ", "")) == 24 * 2**30


def test_integer_sizes_pass_through_and_booleans_do_not():
    assert parse_size(12345) == 12345
    for bad, message in [(True, "give bytes"), (-5, "cannot be negative")]:
        with pytest.raises(OptionError, match=message):
            parse_size(bad)


def test_dtype_names_round_trip_and_others_are_named_in_the_error():
    for name, dtype in DTYPES.items():
        assert parse_dtype(name) is dtype and dtype_name(dtype) == name
    with pytest.raises(OptionError, match="unknown dtype 'float8': choose one of float32, bfloat16, float16"):
        parse_dtype("float8")
    with pytest.raises(OptionError, match="unsupported dtype torch.float64"):
        dtype_name(torch.float64)
