import pytest
import torch

from fiddlerc.compiler.capture import capture, moe_sites
from fiddlerc.compiler.options import CompileOptions, parse_target
from fiddlerc.compiler.pipeline import initial_plan
from fiddlerc.errors import UnsupportedModelError
from fiddlerc.model.folder import load_config, open_model_folder
from fiddlerc.model.meta import build_meta_model
from fiddlerc.passes.find_experts import find_experts


def _find(path):
    folder = open_model_folder(path)
    model = build_meta_model(load_config(folder), torch.float32)
    gm = capture(model)
    options = CompileOptions()
    return gm, find_experts(
        gm, initial_plan(model, folder.config_json, torch.float32, parse_target(2**30), options), options
    )


def test_deepseek_v3_blocks(model_dirs):
    gm, plan = _find(model_dirs("deepseek_v3"))
    assert [ml.layer for ml in plan.moe_layers] == [1, 2]  # layer 0 is dense (first_k_dense_replace)
    ml = plan.moe_layers[0]
    assert (ml.num_experts, ml.top_k) == (8, 2)
    assert ml.bytes_per_expert == 3 * 24 * 32 * 4
    assert ml.shared_expert_bytes == 3 * 24 * 32 * 4  # one shared expert of the same width
    sites = moe_sites(gm.graph)
    assert [len(s.experts) for s in sites] == [8, 8]


def test_qwen2_moe_shared_expert_and_gate(model_dirs):
    _, plan = _find(model_dirs("qwen2_moe"))
    ml = plan.moe_layers[0]
    assert ml.shared_expert_bytes == (3 * 40 * 32 + 32) * 4  # shared MLP + its sigmoid gate
    assert ml.experts_module == "model.layers.0.mlp.experts"


def test_dense_model_is_refused(model_dirs, tmp_path):
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    path = write_model(tiny_config("llama"), tmp_path / "llama")
    with pytest.raises(UnsupportedModelError, match="no mixture-of-experts block fiddlerc recognises"):
        _find(path)


@pytest.mark.parametrize(
    "family, layout, routing",
    [
        ("mixtral", "experts-interface", "softmax top-k"),
        ("deepseek_v3", "experts-interface", "sigmoid + bias, group-limited (1 of 2 groups)"),
        ("deepseek_v2", "experts-interface", "softmax, group-limited (1 of 2 groups)"),
        ("phimoe", "experts-interface", "sparsemixer top-2"),
        ("qwen3_moe", "experts-interface", "softmax top-k"),  # norm_topk_prob=False in the tiny config
        ("dbrx", "dbrx", "softmax top-k"),
        ("jetmoe", "jetmoe", "top-k logits, softmax over the chosen"),
        ("llama4_text", "llama4", "sigmoid top-k; scores scale the expert input"),
    ],
)
def test_layout_and_routing_kind(family, layout, routing, model_dirs):
    _, plan = _find(model_dirs(family))
    assert {(ml.layout, ml.routing) for ml in plan.moe_layers} == {(layout, routing)}


def test_llama4_shared_expert_is_dense(model_dirs):
    _, plan = _find(model_dirs("llama4_text"))
    ml = plan.moe_layers[0]
    assert ml.top_k == 1 and ml.num_experts == 4
    assert ml.shared_expert_bytes == 3 * 24 * 32 * 4  # shared MLP of intermediate_size, kept dense
