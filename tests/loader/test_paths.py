"""What each layer of a loaded model runs at one token, read back from the bound model."""

from __future__ import annotations

import logging

import pytest

import fiddlerc
from fiddlerc.loader.paths import PARTS, paths_text
from fiddlerc.runtime import quant

pytestmark = pytest.mark.skipif(not quant.available(), reason="fiddlerc's C kernels are not built")


def test_a_cpu_load_names_the_c_calls_and_the_reference_kernels_name_torch(compiled):
    with fiddlerc.load(compiled, device="cpu") as model:
        native = model.decode_paths()
        layers = [ml.layer for ml in model.plan.moe_layers]
        assert sorted(native) == layers
        for row in native.values():
            assert row == {
                "attention": "one C call",
                "norms": "one C call each",
                "router": "one C call",
                "experts": "one grouped C call",
            }
    with fiddlerc.load(compiled, device="cpu", kernels="reference") as model:
        for row in model.decode_paths().values():
            assert row["attention"] == "generated torch ops" and row["router"] == "the block's torch ops"
            assert row["norms"] == "one torch.rms_norm each" and row["experts"] == "one by one"


def test_the_text_groups_layers_that_run_alike_in_a_layers_order(compiled):
    rows = {0: {"experts": "a", "attention": "b"}, 1: {"experts": "a", "attention": "b"}, 3: {"experts": "c"}}
    assert paths_text(rows).splitlines() == [
        "decode step, layers 0-1: attention: b, experts: a",
        "decode step, layer 3: experts: c",
    ]
    assert PARTS.index("attention") < PARTS.index("router") < PARTS.index("experts")


def test_load_logs_the_paths(compiled, caplog):
    with caplog.at_level(logging.INFO, logger="fiddlerc.loader.model"):
        fiddlerc.load(compiled, device="cpu").close()
    assert "decode step, layers" in caplog.text and "one grouped C call" in caplog.text
