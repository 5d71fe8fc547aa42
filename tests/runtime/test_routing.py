"""The MoE block at one token on a CPU load: its router in C, beside the reference kernels' Hugging Face block."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from fiddlerc.runtime import quant, routing
from tests.conftest import decode_logits, padded_prompts, tiny_config

needs_kernels = pytest.mark.skipif(quant.library() is None, reason="the C kernels were not built")


def _router(family: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block = model.model.layers[-1].mlp
    return block, config


@pytest.mark.parametrize(
    "family, overrides, want",
    [
        ("mixtral", {}, True),  # Mixtral always renormalises its top k
        ("qwen3_moe", {"norm_topk_prob": True}, True),
        ("qwen3_moe", {"norm_topk_prob": False}, False),
        ("deepseek_v3", {}, None),  # sigmoid scores with a bias and groups: not this router
    ],
)
def test_router_form_is_read_off_a_probe_of_the_routers_class(family, overrides, want):
    block, config = _router(family, **overrides)
    gate = block.gate
    assert routing.router_form(gate, config, int(getattr(gate, "top_k", 2))) is want


@needs_kernels
@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_picks_what_softmax_and_topk_pick_for_each_token(normalise, dtype):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(128, 64, generator=g).to(dtype), torch.randn(3, 64, generator=g).to(dtype)
    picks, weights = routing.route(x, w, 8, normalise)
    assert picks.shape == weights.shape == (3, 8)
    probs = torch.softmax(torch.nn.functional.linear(x, w).float(), dim=-1)
    top_w, top_i = torch.topk(probs, 8)
    if normalise:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    assert picks.tolist() == top_i.tolist()
    torch.testing.assert_close(weights, top_w, rtol=1e-5, atol=1e-6)
    one = routing.route(x[1:2], w, 8, normalise)  # a token alone routes as it does among others
    assert torch.equal(one[0][0], picks[1]) and torch.equal(one[1][0], weights[1])


@needs_kernels
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_token_blocks_route_in_c_and_equal_the_reference(family, dtype, model_dirs, tmp_path):
    fiddlerc.compile(model_dirs(family), tmp_path / "out", gpu_memory="1GiB", context=64, dtype=dtype, fast_experts=2)
    ids = padded_prompts()[0][1:]

    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as ref:
        want, want_stats = decode_logits(ref, ids, (5, 9, 2, 7, 11, 3)), ref.routing_stats()
        assert not any(type(layer.mlp) is routing.OneTokenMoe for layer in ref.hf_model.model.layers)
    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu") as model:
        assert all(type(layer.mlp) is routing.OneTokenMoe for layer in model.hf_model.model.layers)
        first = model.hf_model.model.layers[0].mlp
        assert first.experts is model.placed_experts[0] and first.gate is first.block.gate  # the block's, read through
        got, stats = decode_logits(model, ids, (5, 9, 2, 7, 11, 3)), model.routing_stats()
    tol = 1e-5 if dtype == "float32" else 8e-3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)
    for layer, s in stats["layers"].items():  # the same picks, counted by the C call, by tier
        assert s["per_expert"] == want_stats["layers"][layer]["per_expert"]
        assert (s["fast"], s["cpu"]) == (want_stats["layers"][layer]["fast"], want_stats["layers"][layer]["cpu"])


@needs_kernels
def test_route_refuses_a_top_k_beyond_the_experts():
    w, x = torch.randn(4, 16), torch.randn(1, 16)
    with pytest.raises(ValueError, match="k must be between 1 and the number of experts"):
        routing.route(x, w, 5, True)
