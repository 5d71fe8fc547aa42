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


def test_no_gpu_memory_is_a_cpu_only_plan_without_cuda_and_the_free_memory_less_a_margin_with_it(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = parse_target(None)
    assert t.cpu_only and t.budget_bytes == 0 and "no CUDA device" in t.budget_note
    assert parse_target(0).cpu_only and parse_target("0GiB").cpu_only and parse_target("0").budget_note is None
    with pytest.raises(OptionError, match="needs a GPU tier"):
        parse_target(0, fast_experts=2)
    assert parse_target(0, fast_experts=0).cpu_only

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    t = parse_target(None)
    assert (t.device, t.budget_bytes) == ("cuda:0", 62 * gib)  # 70 free less 10 % of 80
    assert "70.00 GiB free of 80.00 GiB" in t.budget_note and "NVIDIA H100" in t.budget_note
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 4 * gib))
    assert parse_target(None).budget_bytes == 2 * gib  # the margin is at least 1 GiB
    assert parse_target("24GiB").budget_note is None  # given: nothing to note
