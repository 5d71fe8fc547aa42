"""MoE families: every verified family, experts split between tiers, equals Hugging Face; and a family
transformers does not ship, written to the experts interface, compiles with no code changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fiddlerc
from fiddlerc.model.families import VERIFIED
from fiddlerc.tools.demo import write_model
from tests.conftest import VOCAB, hf_greedy, tiny_config

FAMILIES = sorted(VERIFIED)


def test_every_verified_family_has_a_fixture():
    assert all(tiny_config(f) is not None for f in FAMILIES)


def test_readme_lists_the_registry():
    from pathlib import Path

    from fiddlerc.model.families import supported_text

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("<!-- architectures:begin -->\n")[1].split("\n<!-- architectures:end -->")[0]
    assert block == supported_text()


@pytest.fixture(scope="module")
def split_model(model_dirs, hf_model, tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            src = model_dirs(family)
            out = tmp_path_factory.mktemp(family)
            art = fiddlerc.compile(src, out, gpu_memory="1GiB", context=64, fast_experts=0)
            per_layer = art.plan.moe_layers[0].num_experts
            n_fast = len(art.plan.moe_layers) * (per_layer // 2)  # round-robin: half of every layer
            fiddlerc.compile(src, out, gpu_memory="1GiB", context=64, fast_experts=n_fast)
            cache[family] = (hf_model(src), fiddlerc.load(out, device="cpu"))
        return cache[family]

    yield get
    for _, model in cache.values():
        model.close()


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_tokens_and_both_tiers(family, split_model):
    ref, model = split_model(family)
    ids, mask = _prompts()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    got = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = model.routing_stats()
    for layer, s in stats["layers"].items():  # both tiers received tokens in every MoE layer
        assert s["fast"] > 0 and s["cpu"] > 0, (layer, s)
    want_ids = hf_greedy(ref, ids, mask, 8)
    got_ids = model.generate(ids, attention_mask=mask, max_new_tokens=8, ignore_eos=True)
    assert torch.equal(got_ids, want_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbing_one_cpu_expert_changes_logits(family, split_model):
    _, model = split_model(family)
    ids, _ = _prompts()
    before = model(ids)
    stats = model.routing_stats()["layers"]
    layer = max(stats)
    placed = next(p for p in model.placed_experts if p.layer == layer)
    counts = stats[layer]["per_expert"]
    busiest = max((e for e in range(len(counts)) if placed.on_cpu[e]), key=lambda e: counts[e])
    assert counts[busiest] > 0
    w = placed.weights[busiest].w_out
    w = getattr(w, "weight", w)  # a NativeWeight (CPU-only "auto": experts in one C call) reads the tensor as bound
    saved = w.clone()
    try:
        w.add_(torch.randn_like(w) * w.abs().mean() * 20)
        after = model(ids)
    finally:
        w.copy_(saved)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # restored exactly


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_bfloat16_matches_hugging_face_bfloat16(family, model_dirs, tmp_path):
    """Teacher-forced logits against HF in bf16 with per-expert (eager) arithmetic, within bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    src = model_dirs(family)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, experts_implementation="eager").eval()
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=0, dtype="bfloat16")
    fiddlerc.compile(
        src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=len(art.plan.experts) // 2, dtype="bfloat16"
    )
    ids, _ = _prompts()
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        got = model(ids)
        want = ref(input_ids=ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= 0.02 * scale


def _register():
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
    from transformers.integrations import use_experts_implementation

    class FutureMoeConfig(MixtralConfig):
        model_type = "fiddlerc_future_moe"

    @use_experts_implementation(is_transposed=True, has_bias=True)
    class FutureExperts(nn.Module):
        """Transposed weights with biases and a gate of its own: gelu(gate) * tanh(up)."""

        def __init__(self, config):
            super().__init__()
            e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
            self.num_experts = e
            self.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * i) * 0.2)
            self.gate_up_proj_bias = nn.Parameter(torch.randn(e, 2 * i) * 0.2)
            self.down_proj = nn.Parameter(torch.randn(e, i, h) * 0.2)
            self.down_proj_bias = nn.Parameter(torch.randn(e, h) * 0.2)
            self.act_fn = nn.GELU()

        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * torch.tanh(up)

        def forward(self, hidden_states, top_k_index, top_k_weights):  # replaced by the experts interface
            raise NotImplementedError

    class FutureMoeForCausalLM(MixtralForCausalLM):
        config_class = FutureMoeConfig

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp.experts = FutureExperts(config)
            self.post_init()

    AutoConfig.register(FutureMoeConfig.model_type, FutureMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(FutureMoeConfig, FutureMoeForCausalLM, exist_ok=True)
    return FutureMoeConfig


@pytest.mark.parametrize("experts_on_gpu", [0, 3])
def test_future_family_equals_its_reference(tmp_path, experts_on_gpu):
    from transformers import AutoModelForCausalLM

    config_cls = _register()
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)  # fmt: skip
    src = write_model(config, tmp_path / "model", router_scale=8.0)
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=experts_on_gpu)
    assert {ml.layout for ml in art.plan.moe_layers} == {"experts-interface"}
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        torch.testing.assert_close(model(ids), ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids, mask, max_new_tokens=8, ignore_eos=True), hf_greedy(ref, ids, mask, 8))
