"""CompiledModel, the object users hold."""

from __future__ import annotations

import threading

import pytest
import torch

import fiddlerc
from fiddlerc.errors import OptionError
from tests.conftest import VOCAB


def test_unknown_kernel_mode_is_refused(model_dirs, tmp_path):
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    with pytest.raises(OptionError, match="kernels='fast'"):
        fiddlerc.load(tmp_path / "out", device="cpu", kernels="fast")


def test_routing_stats_count_every_routed_pair_once_by_the_tier_that_served_it(compiled):
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with fiddlerc.load(compiled, device="cpu", kernels="reference") as model:
        top_k = model.plan.moe_layers[0].top_k
        model(ids)
        stats = model.routing_stats()
        for placed in model.placed_experts:
            layer = stats["layers"][placed.layer]
            assert layer["fast"] + layer["cpu"] + layer["fetched"] == ids.numel() * top_k == sum(layer["per_expert"])
            on_cpu = sum(n for n, cpu in zip(layer["per_expert"], placed.on_cpu, strict=True) if cpu)
            assert layer["cpu"] + layer["fetched"] == on_cpu  # each pair counted by its expert's tier
            assert layer["hit_rate"] == pytest.approx(layer["fast"] / (ids.numel() * top_k))
        assert stats["fast"] == sum(v["fast"] for v in stats["layers"].values())
        model(ids)
        assert model.routing_stats()["cpu"] == 2 * stats["cpu"]  # counted since load, not per call


def test_inputs_that_are_not_token_ids_are_refused(compiled):
    with fiddlerc.load(compiled, device="cpu") as model:
        for bad in (torch.ones(7, dtype=torch.long), torch.ones(1, 7), [[5, 6, 7]]):
            with pytest.raises(OptionError, match="integer tensor of shape"):
                model(bad)
        with pytest.raises(OptionError, match="drop do_sample"):
            model.generate(torch.tensor([[5, 6]]), num_beams=2, do_sample=True)


def test_close_ends_the_worker_thread_and_a_closed_model_says_so(compiled):
    def workers() -> int:
        return sum(t.name == "fiddlerc-cpu" for t in threading.enumerate())

    before = workers()
    model = fiddlerc.load(compiled, device="cpu")
    assert workers() == before + 1
    model.close()
    model.close()  # twice is harmless
    assert workers() == before
    with pytest.raises(RuntimeError, match="worker was closed: load the model again"):
        model(torch.tensor([[5, 6, 7]]))


def test_a_right_padded_batch_is_refused_with_what_to_do(compiled):
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    with fiddlerc.load(compiled, device="cpu") as model:
        with pytest.raises(OptionError, match="pad on the left"):
            model.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)  # left: fine
