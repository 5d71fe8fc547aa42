"""GeneratedForward, the base class of module.py: micro-batch rows and deferred MoE calls."""

import pytest
import torch
from torch import nn

from fiddlerc.runtime.forward import GeneratedForward


def test_micro_rows_splits_batch_rows_and_shares_what_has_one_row():
    x = torch.arange(12).view(6, 2)
    parts = [GeneratedForward.micro_rows(x, i, 3) for i in range(3)]
    assert torch.equal(torch.cat(parts), x) and all(p.shape == (2, 2) for p in parts)
    shared = torch.arange(5)[None]  # position ids of the whole batch
    assert GeneratedForward.micro_rows(shared, 2, 3) is shared
    assert GeneratedForward.micro_rows(None, 1, 3) is None


class _Placed:
    """Stands in for PlacedExperts: what a deferred call left for each micro-batch."""

    def __init__(self, parts):
        self.deferred, self.parts = None, parts

    def finish(self, micro_batch):
        return self.parts.pop(micro_batch)


def test_wait_adds_the_cpu_experts_part_of_its_micro_batch():
    fwd = GeneratedForward(nn.Identity(), None)
    fwd.placed = {3: _Placed({0: torch.full((2, 4), 0.5, dtype=torch.float32), 1: None})}
    out = torch.ones(1, 2, 4, dtype=torch.bfloat16)
    got = fwd.wait(3, 0, out)
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.full((1, 2, 4), 1.5, dtype=torch.bfloat16))
    assert fwd.wait(3, 1, out) is out  # no CPU expert was hit: the block output as it is


def test_run_micro_leaves_no_call_deferred_when_it_raises():
    class Broken(GeneratedForward):
        def forward_micro(self, input_ids, caches, attention_mask, position_ids):
            self.defer(1)
            raise RuntimeError("stage failed")

    fwd = Broken(nn.Identity(), None)
    fwd.placed = {0: _Placed({}), 1: _Placed({})}
    with pytest.raises(RuntimeError, match="stage failed"):
        fwd.run_micro(None, [], None, None)
    assert [p.deferred for p in fwd.placed.values()] == [None, None]


def test_flatten_modules_makes_children_plain_attributes_that_reassignment_still_replaces():
    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    fwd = GeneratedForward(nn.Module(), config=None)
    fwd.m.body = inner
    fwd.flatten_modules()
    assert fwd.__dict__["m"] is fwd.m and fwd.m.__dict__["body"] is inner and inner.__dict__["0"] is inner[0]
    replacement = nn.Identity()
    fwd.m.body = replacement  # nn.Module.__setattr__ drops the flattened entry as it registers the new child
    assert fwd.m.body is replacement and fwd.m._modules["body"] is replacement
    x = torch.randn(3, 2)
    assert torch.equal(fwd.m.body(x), x)
