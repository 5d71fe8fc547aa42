"""PlacedExperts: CPU experts spread over threads and fetched experts compute what Hugging Face computes."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from tests.conftest import VOCAB


def _decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T-1, V] of a prompt of 1 token followed by T-1 single-token steps (the decode path)."""
    cache, out = model.new_cache(), []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            mask = torch.ones(1, t + 1, dtype=torch.long)
            out.append(model._forward(ids[:, t : t + 1], cache, mask, torch.tensor([[t]]))[0, -1])
    return torch.stack(out)


def test_spreading_a_tokens_experts_over_both_threads_keeps_the_arithmetic(model_dirs, hf_model, tmp_path):
    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf_model(src)(input_ids=ids).logits[0]
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as model:
        assert not any(p.spread for p in model.placed_experts)  # tiny weights: not measured, tiers as placed
        by_tier = _decode_logits(model, ids)
        submitted, worker = [], model.placed_experts[0].worker  # one worker serves every layer
        submit = worker.submit
        worker.submit = lambda fn, *a: submitted.append(len(a[0])) or submit(fn, *a)
        for p in model.placed_experts:
            p.spread = True
        spread = _decode_logits(model, ids)
    assert submitted == [1] * (ids.shape[1] * len(model.placed_experts))  # one of the two picks, every layer and step
    assert torch.equal(spread, by_tier)  # same kernels, same summation order
    torch.testing.assert_close(spread, want, rtol=1e-5, atol=1e-5)


def test_fetched_experts_compute_the_same(model_dirs, hf_model, tmp_path):
    """The fetch path (weights copied to the fast device for a big call) gives the reference's logits."""
    import torch

    import fiddlerc

    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        for placed in model.placed_experts:  # as a plan for a GPU machine would say: fetch from 3 tokens
            placed.fetch_min_tokens = tuple(3 if cpu else None for cpu in placed.on_cpu)
        got = model(ids)
        stats = model.routing_stats()
    with torch.no_grad():
        torch.testing.assert_close(got, hf_model(src)(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert stats["fetched"] > 0 and stats["cpu"] + stats["fetched"] + stats["fast"] == 2 * 12 * 2 * 2


def test_a_fetch_reads_the_tensors_under_native_weights_and_leaves_plain_ones_as_they_are():
    from fiddlerc.runtime.experts import ExpertWeights
    from fiddlerc.runtime.matvec import NativeWeight

    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((32, 16), (32, 16), (16, 32)))
    w = ExpertWeights((gate, up), None, down, None).native(lambda m: m is not up)
    assert [type(m) for m in w.matrices] == [NativeWeight, torch.Tensor, NativeWeight]
    fetched = w.to(torch.device("cpu"), torch.float32)  # what a copy to the GPU does, on the CPU here
    assert all(type(m) is torch.Tensor and m.dtype == torch.float32 for m in fetched.matrices)
    assert torch.equal(fetched.w_in[0], gate.float()) and torch.equal(fetched.w_out, down.float())


def test_a_prompt_over_fine_grained_small_experts_runs_token_by_token_and_equals_the_reference(tmp_path):
    """Qwen3-like routing (many small experts, few tokens each): a prompt's experts run one token at a time
    through the grouped call on a CPU load, equal to the reference's batches by expert, counted alike."""
    from fiddlerc.runtime import quant
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    if quant.library() is None:
        pytest.skip("the grouped call needs the C kernels")
    config = tiny_config("qwen3_moe")
    config.num_experts, config.num_experts_per_tok = 32, 4
    write_model(config, tmp_path / "model", seed=0)
    fiddlerc.compile(tmp_path / "model", tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=8)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as ref:
        want, want_stats = ref(ids), ref.routing_stats()
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        assert all(p._token_by_token(12, 4) for p in model.placed_experts)
        got, stats = model(ids), model.routing_stats()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer, s in stats["layers"].items():
        assert s["per_expert"] == want_stats["layers"][layer]["per_expert"]
        assert (s["fast"], s["cpu"]) == (want_stats["layers"][layer]["fast"], want_stats["layers"][layer]["cpu"])
