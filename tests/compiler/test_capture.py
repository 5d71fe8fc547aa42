"""Capture: the fx graph of a Hugging Face model, with MoE blocks and attention as leaves, and its expansion
into dispatch -> expert -> combine nodes the passes annotate."""

import pytest
import torch
from torch import nn

from fiddlerc.compiler.capture import (
    META_KEY,
    cache_class,
    capture,
    fiddlerc_expert,
    is_token_mixer,
    layer_index,
    moe_sites,
    new_cache,
    source_model,
    trace,
)
from fiddlerc.errors import UnsupportedModelError
from fiddlerc.model.families import find_layout
from tests.conftest import VOCAB


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_the_captured_graph_computes_what_hugging_face_computes(family, model_dirs, hf_model):
    ref = hf_model(model_dirs(family))
    gm = trace(ref)  # unexpanded: every call in it runs
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = gm(ids, new_cache(cache_class(ref), ref.config), None, torch.arange(6)[None])
        want = ref(input_ids=ids).logits
    assert torch.equal(got, want)
    assert source_model(gm) is ref
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert all(".layers." in t for t in leaves if t.endswith(("mlp", "self_attn")))
    blocks = [t for t in leaves if find_layout(gm.get_submodule(t), ref.config.hidden_size) is not None]
    assert len(blocks) == len(moe_sites(capture(ref).graph))  # each MoE block stays one call until expanded


def test_expansion_gives_each_moe_block_one_node_per_expert_in_order(model_dirs, hf_model):
    ref = hf_model(model_dirs("deepseek_v3"))  # layer 0 dense, layers 1-2 with 8 experts
    gm = capture(ref)
    sites = moe_sites(gm.graph)
    assert [(s.layer, s.block_path, s.experts_path) for s in sites] == [
        (1, "model.layers.1.mlp", "model.layers.1.mlp.experts"),
        (2, "model.layers.2.mlp", "model.layers.2.mlp.experts"),
    ]
    for s in sites:
        assert [n.name for n in s.experts] == [f"expert_{s.layer}_{e}" for e in range(8)]
        assert all(n.target is fiddlerc_expert and n.args == (s.dispatch, e) for e, n in enumerate(s.experts))
        assert s.combine.name == f"moe_{s.layer}" and s.combine.args == (s.dispatch, *s.experts)
        assert s.combine.meta[META_KEY]["layout"] == s.dispatch.meta[META_KEY]["layout"]
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "m.model.layers.0.mlp.gate_proj" in calls  # the dense MLP is traced through
    assert not {"m.model.layers.1.mlp", "m.model.layers.2.mlp"} & calls  # the MoE blocks are expanded
    with pytest.raises(RuntimeError, match="graph marker"):
        fiddlerc_expert(None, 0)


def test_layer_index_reads_the_first_number_of_a_module_path():
    assert layer_index("model.layers.3.mlp") == 3
    assert layer_index("transformer.blocks.12.ffn.experts") == 12
    with pytest.raises(UnsupportedModelError, match="which decoder layer 'model.norm'"):
        layer_index("model.norm")


def test_token_mixers_are_the_innermost_modules_that_take_the_cache(model_dirs, hf_model):
    ref = hf_model(model_dirs("mixtral"))
    mixers = [name for name, m in ref.named_modules() if is_token_mixer(m)]
    assert mixers == [f"model.layers.{i}.self_attn" for i in range(ref.config.num_hidden_layers)]


def test_the_cache_class_is_the_one_the_family_asks_for(model_dirs, hf_model):
    from transformers import DynamicCache

    assert cache_class(hf_model(model_dirs("mixtral"))) is DynamicCache
    minimax = cache_class(hf_model(model_dirs("minimax")))
    assert minimax is not DynamicCache and minimax.__name__ == "MiniMaxCache"


def test_a_model_fx_cannot_capture_is_an_unsupported_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, vocab_size=64)  # fmt: skip
    model = MixtralForCausalLM(config)

    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # control flow on a traced value

    model.model.norm = DataDependent()
    with pytest.raises(UnsupportedModelError, match="MixtralForCausalLM could not be captured with torch.fx"):
        trace(model)
