"""A family transformers does not ship, written to the experts interface, compiles with no code changes."""

import pytest
import torch
from torch import nn

import fiddlerc
from fiddlerc.tools.demo import write_model
from tests.conftest import VOCAB, hf_greedy


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
